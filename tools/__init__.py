"""Command-line tools (python tools/NAME.py) and the code they alone use, such as huggingface_io."""
