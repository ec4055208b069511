"""The mods the GPU tests of padded batches, packed sequences and inference share, each with the
formula of its scores for oracle.attention (float64 on the CPU), built for H query heads; and the
cu_seqlens of packed sequences."""

import torch

from cudnn_flex import dsl_mods, mods

H = 4
NEG_INF = float("-inf")
SOFTCAP = dsl_mods.softcap(20.0)
SLOPES = mods.alibi_slopes(H)


def cu_seqlens(lengths, device="cpu") -> torch.Tensor:
    """int32 [n + 1]: 0, then the running sum of the lengths (FlashAttention's cu_seqlens)."""
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def where_kept(keep, s):
    """s where keep, else -inf (a mask in a formula)."""
    return torch.where(keep, s, torch.tensor(NEG_INF, dtype=s.dtype))


# name -> (flex_attention kwargs for a device, the formula of the scores)
MODS = {
    "none": (lambda device: {}, lambda s, b, h, q, kv: s),
    "causal": (lambda device: dict(mask_mod=mods.causal), lambda s, b, h, q, kv: where_kept(q >= kv, s)),
    "alibi": (lambda device: dict(score_mod=mods.alibi(SLOPES.to(device))),
              lambda s, b, h, q, kv: s + SLOPES.view(-1).double()[h] * (kv - q)),
    "dsl alibi over score_mod_tensors": (
        lambda device: dict(score_mod=dsl_mods.alibi, score_mod_tensors={"slopes": SLOPES.to(device)}),
        lambda s, b, h, q, kv: s + SLOPES.view(-1).double()[h] * (kv - q)),
    "dsl softcap with its bprop": (lambda device: dict(score_mod=SOFTCAP.forward, score_mod_bprop=SOFTCAP.backward),
                                   lambda s, b, h, q, kv: 20.0 * torch.tanh(s / 20.0)),
    "softcap + window (a band)": (lambda device: dict(score_mod=mods.softcap(20.0), mask_mod=mods.sliding_window(50)),
                                  lambda s, b, h, q, kv: where_kept((q >= kv) & (q - kv < 50),
                                                                    20.0 * torch.tanh(s / 20.0))),
}
