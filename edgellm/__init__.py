"""edgellm: an LLM inference engine for the hardware people have."""

__version__ = "0.1.0"
