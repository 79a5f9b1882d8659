"""Errors raised by the inference package.

Every error carries ``retryable``: the worker retries a job that failed with a retryable error
and fails it permanently otherwise (the reason is kept on the job).
"""

from __future__ import annotations


class InferenceError(Exception):
    """Base class for every error raised by ``inference``."""

    retryable = False


class PixelDataError(InferenceError):
    """The image cannot be decoded or converted (unsupported syntax, corrupt data)."""


class ImageTooLargeError(PixelDataError):
    """rows x columns x frames x bytes is above the configured guard; refused before decoding."""


class ModelPackageError(InferenceError):
    """A model package is missing a file, or its model.json or weights are inconsistent."""


class ResultBuildError(InferenceError):
    """An SR or SC dataset could not be built from a prediction."""


class DeviceError(InferenceError):
    """The compute device failed (out of memory, CUDA error); worth another try."""

    retryable = True
