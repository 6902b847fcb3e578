"""An example third-party lmforge plugin package."""
