"""Errors a user can act on.

Every failure caused by input (a model file, a prompt, a parameter) is raised as an
``EdgeLLMError`` carrying what was wrong and what to do about it. The CLI prints it as one
message and exits non-zero without a traceback; the HTTP server maps it to a 4xx answer.
"""

from __future__ import annotations


class EdgeLLMError(Exception):
    """A problem in the user's input, with the fix."""

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return self.problem if not self.fix else f"{self.problem}\n  fix: {self.fix}"


class ModelNotFoundError(EdgeLLMError):
    """The model path or name does not lead to weights on this machine."""


class ModelFormatError(EdgeLLMError):
    """A model file is malformed: wrong magic, truncated data, impossible shapes."""


class UnsupportedModelError(EdgeLLMError):
    """A well-formed model that uses an architecture or tensor type we do not run."""


class ContextOverflowError(EdgeLLMError):
    """A prompt (plus the tokens asked for) does not fit the context window or KV pool."""


class InvalidParameterError(EdgeLLMError):
    """A sampling or command parameter outside its valid range."""
