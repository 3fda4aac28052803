"""Vocabulary extension for a new language or domain (Colossal-LLaMA's recipe): pieces from a corpus, the
tokenizer extended with them (old ids never change), and a model whose new embedding rows start at the mean
of the rows of each piece's old tokenisation."""
from .embeddings import init_new_embeddings, old_tokenization, save_extended_model
from .tokenizer import (
    corpus_texts, extend_tokenizer, is_new_script_piece, load_source_tokenizer, pieces_from_corpus, read_pieces,
    write_pieces,
)

__all__ = ["corpus_texts", "extend_tokenizer", "is_new_script_piece", "load_source_tokenizer",
           "pieces_from_corpus", "read_pieces", "write_pieces", "init_new_embeddings", "old_tokenization", "save_extended_model"]
