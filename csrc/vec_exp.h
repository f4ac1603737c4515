// exp for float and double written so that compilers vectorise it (no branches, no
// library call, no table), for the fused CPU RCE loss.
//
//   exp(x) = 2^n * p(r),  n = round(x / ln 2),  r = x - n ln 2 (Cody-Waite, two parts),
//   p a polynomial for e^r on |r| <= ln(2)/2: degree 6 fitted to relative error for
//   float (1.8e-8 with the float coefficients), the degree-13 Taylor polynomial for
//   double (6e-18).
//
// Special values and range, identical on every target:
//   x < kLo   -> +0. kLo lies just above ln(smallest normal), so every result this
//                function returns is 0 or a normal number: inputs whose exp would be
//                subnormal are flushed to zero instead of being computed, which is the
//                slow path of several vectorised exp implementations (and the RCE loss
//                adds these terms to sums >= 1 or subtracts them from 1/(L-1), where
//                values below 2^-126 cannot change a float result).
//   x > kHi   -> +inf (kHi = the largest input whose exp is finite).
//   NaN       -> NaN;  -inf -> 0;  +inf -> +inf;  0 -> exactly 1.
// Maximum error in [kLo, kHi] against exp in higher precision: float 1.3625 ulp (every
// one of the 2.24e9 float inputs, at x = 5.2007337), double 1.18 ulp (24 million random
// inputs against long double); tests/test_cpu_exp.py checks <= 1.5 ulp on samples.
//
// Every operation is an IEEE add, multiply, compare or integer op on the bit pattern,
// evaluated in the written order (the library compiles this with -ffp-contract=off), so
// the result is bitwise the same whatever instruction set the loop is vectorised for.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

namespace rce_fast {

template <typename T>
struct ExpConsts;

template <>
struct ExpConsts<float> {
  using Bits = uint32_t;
  static constexpr float kLo = -87.3365f;               // ln(2^-126) = -87.33654475...
  static constexpr float kHi = 88.72283172607421875f;   // largest float below ln(FLT_MAX)
  static constexpr float kLog2e = 1.44269502162933349609375f;
  static constexpr float kLn2Hi = 0.693145751953125f;   // 15 significant bits: n*hi exact
  static constexpr float kLn2Lo = 1.428606765330187045e-06f;
  static constexpr float kShifter = 12582912.0f;        // 1.5 * 2^23: adding it rounds to int
  static constexpr Bits kBias = 127;
  static constexpr int kMantBits = 23;
  static constexpr float kMaxN = 127.0f;                // largest exponent of a normal float
};

template <>
struct ExpConsts<double> {
  using Bits = uint64_t;
  static constexpr double kLo = -708.3964;              // ln(2^-1022) = -708.39641853...
  static constexpr double kHi = 709.782712893384;       // largest double below ln(DBL_MAX)
  static constexpr double kLog2e = 1.4426950408889634;
  static constexpr double kLn2Hi = 0.6931471803691238;  // 32 significant bits
  static constexpr double kLn2Lo = 1.9082149292705877e-10;
  static constexpr double kShifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr Bits kBias = 1023;
  static constexpr int kMantBits = 52;
  static constexpr double kMaxN = 1023.0;
};

template <typename To, typename From>
inline To bits_as(From v) {
  static_assert(sizeof(To) == sizeof(From), "size mismatch");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

// e^r on |r| <= ln(2)/2 + a little (n is rounded in float, so |r| can exceed ln(2)/2 by
// an ulp of x / ln 2 times ln 2).
inline float exp_poly(float r) {
  float p = 0.0013843619963154197f;
  p = p * r + 0.008374184370040894f;
  p = p * r + 0.04166800528764725f;
  p = p * r + 0.16666430234909058f;
  p = p * r + 0.4999999403953552f;
  p = p * r + 1.0f;
  return p * r + 1.0f;
}

inline double exp_poly(double r) {
  // 1/k!, k = 13 .. 0
  double p = 1.6059043836821613e-10;
  p = p * r + 2.08767569878681e-09;
  p = p * r + 2.505210838544172e-08;
  p = p * r + 2.755731922398589e-07;
  p = p * r + 2.7557319223985893e-06;
  p = p * r + 2.48015873015873e-05;
  p = p * r + 0.0001984126984126984;
  p = p * r + 0.001388888888888889;
  p = p * r + 0.008333333333333333;
  p = p * r + 0.041666666666666664;
  p = p * r + 0.16666666666666666;
  p = p * r + 0.5;
  p = p * r + 1.0;
  return p * r + 1.0;
}

template <typename T>
inline T exp_flush(T x) {
  using C = ExpConsts<T>;
  using Bits = typename C::Bits;
  // NaN fails every comparison, so it flows through to the result unchanged.
  T xc = x < C::kLo ? C::kLo : x;
  xc = xc > C::kHi ? C::kHi : xc;
  const T shifted = xc * C::kLog2e + C::kShifter;  // round(x / ln 2) in the low bits
  T n = shifted - C::kShifter;
  T r = xc - n * C::kLn2Hi;
  r = r - n * C::kLn2Lo;
  T p = exp_poly(r);
  Bits nb = bits_as<Bits>(shifted) - bits_as<Bits>(C::kShifter);  // n, two's complement
  // Just below kHi, n is one past the largest normal exponent: move a factor 2 into p.
  const bool top = n > C::kMaxN;
  p = top ? p + p : p;
  nb = top ? nb - Bits(1) : nb;
  const T scale = bits_as<T>(static_cast<Bits>((nb + C::kBias) << C::kMantBits));
  T y = p * scale;
  y = x < C::kLo ? T(0) : y;
  y = x > C::kHi ? std::numeric_limits<T>::infinity() : y;
  return y;
}

}  // namespace rce_fast
