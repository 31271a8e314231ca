"""vigil: post-market performance monitoring for AI medical devices (see DESIGN.md)."""

__version__ = "0.3.0"  # also the checkpoint guard: bump when pickled state changes layout
