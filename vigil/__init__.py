"""vigil: post-market performance monitoring for AI medical devices (see DESIGN.md)."""

__version__ = "0.1.0"
