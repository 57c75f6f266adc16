"""Data: loading, format standardization, chat templates, tokenization with loss masks, generators."""
