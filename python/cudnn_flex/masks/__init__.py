"""Masks cuDNN can skip tiles for: recognised from recorded programs."""
