// The legacy GGUF types' CPU rows (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) for csrc/gguf_matmul_cpu.cpp,
// which includes this twice: with LEGACY_ATTR the AVX2 target and LEGACY_DOT_US(u, s) the
// VPMADDUBSW + VPMADDWD dot product of unsigned bytes u and signed bytes s (8 int32 sums of
// four), and with the AVX-512 VNNI target and VPDPBUSD. No include guard, on purpose.

// The legacy types' rows. Per block: 8 int32 partial sums of the codes times the activations
// (``dot``; unsigned codes as stored), and its fp16 scale and min (or the scale twice) widened
// together and multiplied by the activation block's scale and scale-times-sum in one go: lane
// 0 scales the sums, lane 1 (summed over the row in ``terms``) is the min term, or the codes'
// offset (8 or 16) times it (Q8_0, signed codes, has neither: its scale alone). Two
// accumulators, so consecutive blocks do not wait on one chain.
template <typename Block>
LEGACY_ATTR __m256 legacy_block(const Block& block, const uint8_t* w, const Q8& x, __m256 acc,
                                 __m128* terms) {
  if constexpr (!Block::Min && Block::offset == 0.f)   // Q8_0: the scale alone
    return _mm256_fmadd_ps(_mm256_set1_ps(f16(w) * x.d),
                           _mm256_cvtepi32_ps(block.dot(w, x.q)), acc);
  const __m128 f = _mm_mul_ps(block.scales(w),   // [d * xd, min * xs] or [d * xd, d * xs]
                              _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(&x.d))));
  *terms = _mm_add_ps(*terms, f);
  return _mm256_fmadd_ps(_mm256_broadcastss_ps(f), _mm256_cvtepi32_ps(block.dot(w, x.q)), acc);
}

template <typename Block>
LEGACY_ATTR float legacy_row(const uint8_t* w, const Q8* x, int64_t nb, int bytes, Block block) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m128 terms = _mm_setzero_ps();
  int64_t b = 0;
  for (; b + 1 < nb; b += 2, w += 2 * bytes) {
    prefetch_ahead(w);   // a pair of blocks: 36-68 bytes, about a line
    acc0 = legacy_block(block, w, x[b], acc0, &terms);
    acc1 = legacy_block(block, w + bytes, x[b + 1], acc1, &terms);
  }
  if (b < nb) acc0 = legacy_block(block, w, x[b], acc0, &terms);
  const float term = _mm_cvtss_f32(_mm_shuffle_ps(terms, terms, 1));
  return hsum(_mm256_add_ps(acc0, acc1)) + (Block::Min ? term : -Block::offset * term);
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
  LEGACY_ATTR __m256i dot(const uint8_t* w, const int8_t* x) const {
    return LEGACY_DOT_US(nibbles32(w + (M ? 4 : 2)), load(x));
  }
};

template <bool M>
struct Q5Block {
  static constexpr bool Min = M;
  static constexpr float offset = M ? 0.f : 16.f;
  LEGACY_ATTR __m128 scales(const uint8_t* w) const { return M ? halves2(w) : half_twice(w); }
  LEGACY_ATTR __m256i dot(const uint8_t* w, const int8_t* x) const {
    const __m256i q = _mm256_or_si256(nibbles32(w + (M ? 8 : 6)), fifth_bits(load32(w + (M ? 4 : 2))));
    return LEGACY_DOT_US(q, load(x));
  }
};

struct Q8_0Block {
  static constexpr bool Min = false;
  static constexpr float offset = 0.f;
  LEGACY_ATTR __m128 scales(const uint8_t* w) const { return half_twice(w); }
  LEGACY_ATTR __m256i dot(const uint8_t* w, const int8_t* x) const {
    const __m256i a = load(w + 2);   // signed codes: their signs moved onto x
    return LEGACY_DOT_US(_mm256_sign_epi8(a, a), _mm256_sign_epi8(load(x), a));
  }
};

