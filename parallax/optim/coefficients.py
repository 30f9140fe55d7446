"""Polynomial coefficients (a, b, c) of the odd quintic p(x) = a x + b x^3 + c x^5
used by the Newton-Schulz family of orthogonalizers."""

import math

# Keller Jordan's Muon coefficients, also the defaults of torch.optim.Muon.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.775, 2.0315)

# Polar Express, degree 5, tuned for singular values in [1e-3, 1]
# (Amsel, Persson, Musco, Gower, arXiv:2505.16932, Algorithm 1).
_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
)
# Later iterations converge to this polynomial, which maps 1 to 1.
_POLAR_EXPRESS_LIMIT = (1.875, -1.25, 0.375)
# The paper divides each polynomial's input scale by 1.01 so bf16 rounding
# cannot push a singular value past the interval the polynomial was tuned on.
POLAR_EXPRESS_SAFETY = 1.01

POLAR_EXPRESS_COEFFICIENTS = tuple(
    (a / POLAR_EXPRESS_SAFETY, b / POLAR_EXPRESS_SAFETY**3, c / POLAR_EXPRESS_SAFETY**5)
    for a, b, c in _POLAR_EXPRESS_RAW
) + (_POLAR_EXPRESS_LIMIT,)


# Far past convergence (a few dozen steps at most), and a schedule is a list of this length.
MAX_STEPS = 10_000


def coefficient_schedule(coefficients, steps):
    """Return `steps` (a, b, c) tuples.

    `coefficients` is one (a, b, c) tuple, repeated every step, or a sequence of
    tuples, one per step, whose last entry repeats once the sequence runs out.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an int in [1, {MAX_STEPS}], got {steps!r}")
    coefficients = tuple(coefficients)
    if len(coefficients) == 3 and all(isinstance(c, (int, float)) for c in coefficients):
        coefficients = (coefficients,)
    for triple in coefficients:
        if len(triple) != 3 or not all(math.isfinite(float(c)) for c in triple):
            raise ValueError(
                "coefficients must be an (a, b, c) tuple of finite floats or a "
                f"sequence of such tuples, got {coefficients!r}"
            )
    schedule = coefficients[:steps]
    return schedule + (coefficients[-1],) * (steps - len(schedule))


def apply_polynomial(x, coefficients):
    """Apply p(x) = a x + b x^3 + c x^5 to a scalar singular value."""
    a, b, c = coefficients
    x2 = x * x
    return x * (a + x2 * (b + c * x2))
