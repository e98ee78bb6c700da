"""SSIM and PASS (Perceptual Adversarial Similarity Score; Rozsa, Rudd, Boult 2016), docs/semantics.md

PASS(x̃, x) = SSIM(ψ(x̃, x), x), where ψ aligns x̃ to x with the homography maximising the Enhanced Correlation
Coefficient (OpenCV ``findTransformECC``, MOTION_HOMOGRAPHY, 50 iterations, eps 1e-3, gaussFiltSize 5), warped
with ``INTER_LINEAR | WARP_INVERSE_MAP``. SSIM uses an 11×11 Gaussian window (σ 1.5), K1 0.01, K2 0.03, L 255,
averaged over the **full-size** map (OpenCV's default reflect-101 borders, as OpenCV's SSIM tutorial). For RGB,
ECC runs on the grayscale image (OpenCV's luma weights), the homography is applied to every channel, and SSIM
is the mean over channels. When ECC does not converge the identity is used and counted.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["pass_score", "pass_scores", "ssim", "ssim_map"]

_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


def _blur(img):
    return cv2.GaussianBlur(img, (11, 11), 1.5)


def ssim_map(a, b) -> np.ndarray:
    """The full-size SSIM map ``[H, W]`` of two one-channel images (pixel units; reflect-101 borders)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"ssim_map needs two [H, W] images of one shape, got {a.shape} and {b.shape}")
    mu_a, mu_b = _blur(a), _blur(b)
    var_a = _blur(a * a) - mu_a**2
    var_b = _blur(b * b) - mu_b**2
    cov = _blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + _C1) * (2 * cov + _C2)
    den = (mu_a**2 + mu_b**2 + _C1) * (var_a + var_b + _C2)
    return num / den


def ssim(a, b) -> float:
    """SSIM of two images ``[H, W]`` or ``[H, W, C]`` in pixel units 0..255 (mean over channels)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"ssim needs images of one shape, got {a.shape} and {b.shape}")
    if a.ndim == 2:
        return float(np.mean(ssim_map(a, b)))
    if a.ndim != 3:
        raise ValueError(f"ssim needs [H, W] or [H, W, C] images, got shape {a.shape}")
    return float(np.mean([np.mean(ssim_map(a[..., c], b[..., c])) for c in range(a.shape[2])]))


def _gray(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return img.astype(np.float32)
    if img.shape[2] == 1:
        return img[..., 0].astype(np.float32)
    return cv2.cvtColor(img.astype(np.float32), cv2.COLOR_RGB2GRAY)


def pass_score(adversarial, original) -> tuple[float, bool]:
    """PASS of one image pair (pixels 0..255, ``[H, W]`` or ``[H, W, C]``); returns (score, ECC converged)."""
    adv = np.asarray(adversarial, np.float32)
    orig = np.asarray(original, np.float32)
    if adv.shape != orig.shape:
        raise ValueError(f"pass_score needs images of one shape, got {adv.shape} and {orig.shape}")
    warp = np.eye(3, dtype=np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-3)
    converged = True
    try:
        _, warp = cv2.findTransformECC(_gray(orig), _gray(adv), warp, cv2.MOTION_HOMOGRAPHY, criteria, None, 5)
    except cv2.error:
        converged = False
        warp = np.eye(3, dtype=np.float32)
    h, w = orig.shape[:2]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    if adv.ndim == 3 and adv.shape[2] > 1:
        aligned = np.stack([cv2.warpPerspective(adv[..., c], warp, (w, h), flags=flags)
                            for c in range(adv.shape[2])], -1)
    else:
        aligned = cv2.warpPerspective(adv.reshape(h, w), warp, (w, h), flags=flags).reshape(adv.shape)
    return ssim(aligned.squeeze(), orig.squeeze()), converged


def pass_scores(adversarial, original) -> tuple[np.ndarray, int]:
    """PASS for a batch ``[N, H, W, C]``; returns (scores [N], number of pairs where ECC did not converge)."""
    scores, failures = [], 0
    for a, o in zip(np.asarray(adversarial), np.asarray(original)):
        s, ok = pass_score(a, o)
        scores.append(s)
        failures += not ok
    return np.asarray(scores), failures
