"""Text processing: tokenizer and chat templates, incremental detokenizer, chat prompt rendering."""
