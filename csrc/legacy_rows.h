// The legacy GGUF types' CPU rows (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) for csrc/gguf_matmul_cpu.cpp,
// which includes this twice: with LEGACY_ATTR the AVX2 target and LEGACY_DOT_US(u, s) the
// VPMADDUBSW + VPMADDWD dot product of unsigned bytes u and signed bytes s (8 int32 sums of
// four), and with the AVX-512 VNNI target and VPDPBUSD. No include guard, on purpose.

// The legacy types' rows, for a tile of R rows of activations against one row of W: each
// weight block is loaded and unpacked once (``Block::unpack``: its codes as 32 bytes) and its
// fp16 scale and min (or the scale twice) widened once, then used for every row of the tile,
// where a row at a time unpacked it again per row (8 rows, a decode step of 8 sequences:
// SmolLM2's layers of Q4_1 products 19-21 -> 13-15 ms on the VNNI rows). Per block and row: 8
// int32 partial sums of the codes times the activations (``dot``; unsigned codes as stored),
// and the widened pair multiplied by the activation block's scale and scale-times-sum in one
// go: lane 0 scales the sums, lane 1 (summed over the row in ``terms``) is the min term, or the
// codes' offset (8 or 16) times it (Q8_0, signed codes, has neither: its scale alone). Two
// accumulators a row, so consecutive blocks do not wait on one chain. Each row's sum is the
// same float work in the same order whatever R and its place in the tile: an output does not
// depend on the rows multiplied beside it.
template <typename Block>
LEGACY_ATTR __m256 legacy_block(const Block& block, __m256i q, __m128 scales, const Q8& x,
                                 __m256 acc, __m128* terms) {
  if constexpr (!Block::Min && Block::offset == 0.f)   // Q8_0: the scale alone
    return _mm256_fmadd_ps(_mm256_set1_ps(_mm_cvtss_f32(scales) * x.d),
                           _mm256_cvtepi32_ps(block.dot(q, x.q)), acc);
  const __m128 f = _mm_mul_ps(scales,   // [d * xd, min * xs] or [d * xd, d * xs]
                              _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(&x.d))));
  *terms = _mm_add_ps(*terms, f);
  return _mm256_fmadd_ps(_mm256_broadcastss_ps(f), _mm256_cvtepi32_ps(block.dot(q, x.q)), acc);
}

// out[r] = row w (nb blocks of ``bytes``) times activation row r (x + r * xs blocks), r < R.
template <int R, typename Block>
LEGACY_ATTR void legacy_tile(const uint8_t* w, const Q8* x, int64_t xs, int64_t nb, int bytes,
                             Block block, float* out) {
  __m256 acc0[R], acc1[R];
  __m128 terms[R];
  for (int r = 0; r < R; ++r)
    acc0[r] = acc1[r] = _mm256_setzero_ps(), terms[r] = _mm_setzero_ps();
  int64_t b = 0;
  for (; b + 1 < nb; b += 2, w += 2 * bytes) {
    prefetch_ahead(w);   // a pair of blocks: 36-68 bytes, about a line
    const __m256i q0 = block.unpack(w), q1 = block.unpack(w + bytes);
    const __m128 s0 = block.scales(w), s1 = block.scales(w + bytes);
    for (int r = 0; r < R; ++r) {
      acc0[r] = legacy_block(block, q0, s0, x[r * xs + b], acc0[r], &terms[r]);
      acc1[r] = legacy_block(block, q1, s1, x[r * xs + b + 1], acc1[r], &terms[r]);
    }
  }
  if (b < nb) {
    const __m256i q = block.unpack(w);
    const __m128 s = block.scales(w);
    for (int r = 0; r < R; ++r)
      acc0[r] = legacy_block(block, q, s, x[r * xs + b], acc0[r], &terms[r]);
  }
  for (int r = 0; r < R; ++r) {
    const float term = _mm_cvtss_f32(_mm_shuffle_ps(terms[r], terms[r], 1));
    out[r] = hsum(_mm256_add_ps(acc0[r], acc1[r])) + (Block::Min ? term : -Block::offset * term);
  }
}

// ``rows`` rows of activations: tiles of 4, then one of the rest.
template <typename Block>
LEGACY_ATTR void legacy_rows(const uint8_t* w, const Q8* x, int64_t xs, int64_t nb, int bytes,
                             int rows, float* out) {
  const Block block;
  for (; rows >= 4; rows -= 4, x += 4 * xs, out += 4)
    legacy_tile<4>(w, x, xs, nb, bytes, block, out);
  switch (rows) {
    case 3: legacy_tile<3>(w, x, xs, nb, bytes, block, out); break;
    case 2: legacy_tile<2>(w, x, xs, nb, bytes, block, out); break;
    case 1: legacy_tile<1>(w, x, xs, nb, bytes, block, out); break;
    default: break;
  }
}

// The fp16 pair at byte 0 (scale, min) widened; or the scale twice.
LEGACY_ATTR __m128 halves2(const uint8_t* w) {
  return _mm_cvtph_ps(_mm_cvtsi32_si128((int)load32(w)));
}
LEGACY_ATTR __m128 half_twice(const uint8_t* w) {
  return _mm_cvtph_ps(_mm_cvtsi32_si128((int)(load16(w) * 0x10001u)));
}

template <bool M>
struct Q4Block {
  static constexpr bool Min = M;
  static constexpr float offset = M ? 0.f : 8.f;
  LEGACY_ATTR __m128 scales(const uint8_t* w) const { return M ? halves2(w) : half_twice(w); }
  LEGACY_ATTR __m256i unpack(const uint8_t* w) const { return nibbles32(w + (M ? 4 : 2)); }
  LEGACY_ATTR __m256i dot(__m256i q, const int8_t* x) const { return LEGACY_DOT_US(q, load(x)); }
};

template <bool M>
struct Q5Block {
  static constexpr bool Min = M;
  static constexpr float offset = M ? 0.f : 16.f;
  LEGACY_ATTR __m128 scales(const uint8_t* w) const { return M ? halves2(w) : half_twice(w); }
  LEGACY_ATTR __m256i unpack(const uint8_t* w) const {
    return _mm256_or_si256(nibbles32(w + (M ? 8 : 6)), fifth_bits(load32(w + (M ? 4 : 2))));
  }
  LEGACY_ATTR __m256i dot(__m256i q, const int8_t* x) const { return LEGACY_DOT_US(q, load(x)); }
};

struct Q8_0Block {
  static constexpr bool Min = false;
  static constexpr float offset = 0.f;
  LEGACY_ATTR __m128 scales(const uint8_t* w) const { return half_twice(w); }
  LEGACY_ATTR __m256i unpack(const uint8_t* w) const { return load(w + 2); }
  LEGACY_ATTR __m256i dot(__m256i a, const int8_t* x) const {   // signed codes: their signs
    return LEGACY_DOT_US(_mm256_sign_epi8(a, a), _mm256_sign_epi8(load(x), a));   // onto x
  }
};

