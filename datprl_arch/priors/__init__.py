"""The text priors of the domain pool: descriptions files, text encoders, description embeddings and what a training
run reads of them.

``descriptions`` (the JSON format: image name -> text), ``encoders`` (texts -> vectors; descriptions files ->
embeddings), ``embeddings`` (the embeddings file format and its lookup by GT path), ``training`` (the embeddings a run
aligns its domain prompts to, from its ``train:`` keys). ``python -m datprl_arch.tools.encode_descriptions`` is the
command line; the alignment loss itself is ``losses.alignment_loss``.
"""
from .descriptions import DescriptionError, read_descriptions
from .embeddings import DescriptionEmbeddings, EmbeddingsFileError, load_description_embeddings
from .encoders import clip_encoder, encode_files, hash_encoder, sentence_transformers_encoder

__all__ = ['DescriptionEmbeddings', 'DescriptionError', 'EmbeddingsFileError', 'clip_encoder', 'encode_files',
           'hash_encoder', 'load_description_embeddings', 'read_descriptions', 'sentence_transformers_encoder']
