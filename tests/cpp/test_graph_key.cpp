#include <gtest/gtest.h>

#include <cmath>
#include <unordered_set>

#include "graph_key.h"

using cudnn_flex::GraphKey;

TEST(GraphKey, EqualFieldsGiveEqualKeysAndHashes) {
  GraphKey a, b;
  a.add(int64_t{4}).add(std::vector<int64_t>{2, 16, 128, 64}).add(0.125).add(std::string_view("bias"));
  b.add(int64_t{4}).add(std::vector<int64_t>{2, 16, 128, 64}).add(0.125).add(std::string_view("bias"));
  EXPECT_EQ(a, b);
  EXPECT_EQ(a.hash(), b.hash());
}

TEST(GraphKey, EveryFieldMatters) {
  auto make = [](int64_t id, double scale, std::vector<int64_t> dims, std::string_view name, bool flag) {
    GraphKey k;
    k.add(id).add(scale).add(dims).add(name).add(flag);
    return k;
  };
  const GraphKey base = make(1, 0.5, {1, 2, 3, 4}, "slopes", false);
  EXPECT_NE(base, make(2, 0.5, {1, 2, 3, 4}, "slopes", false));
  EXPECT_NE(base, make(1, 0.25, {1, 2, 3, 4}, "slopes", false));
  EXPECT_NE(base, make(1, 0.5, {1, 2, 3, 5}, "slopes", false));
  EXPECT_NE(base, make(1, 0.5, {1, 2, 3, 4}, "slopez", false));
  EXPECT_NE(base, make(1, 0.5, {1, 2, 3, 4}, "slopes", true));
  // A scale differing only in its last bit is another graph.
  EXPECT_NE(base, make(1, std::nextafter(0.5, 1.0), {1, 2, 3, 4}, "slopes", false));
}

TEST(GraphKey, LengthPrefixSeparatesFieldBoundaries) {
  GraphKey a, b;
  a.add(std::vector<int64_t>{1, 2}).add(std::vector<int64_t>{3});
  b.add(std::vector<int64_t>{1}).add(std::vector<int64_t>{2, 3});
  EXPECT_NE(a, b);
  GraphKey c, d;
  c.add(std::string_view("ab")).add(std::string_view("c"));
  d.add(std::string_view("a")).add(std::string_view("bc"));
  EXPECT_NE(c, d);
}

TEST(GraphKey, HashesSpreadOverManyShapes) {
  std::unordered_set<size_t> hashes;
  for (int64_t b = 1; b <= 8; ++b)
    for (int64_t s = 64; s <= 64 * 32; s += 64)
      for (int64_t d : {64, 128}) {
        GraphKey k;
        k.add(std::vector<int64_t>{b, 16, s, d});
        hashes.insert(k.hash());
      }
  EXPECT_EQ(hashes.size(), 8u * 32u * 2u);
}
