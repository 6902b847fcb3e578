"""Data: tokenizers and the text datamodule."""
