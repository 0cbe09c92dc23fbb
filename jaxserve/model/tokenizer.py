"""The model layer's tokenizers: re-exported from the jax-free `jaxserve.tokenizer`."""

from jaxserve.tokenizer import (BYTE_TOKENIZER_FILE, HF_TOKENIZER_FILE, SPECIAL_IDS_FILE, ByteTokenizer,  # noqa: F401
                                HFTokenizer, Tokenizer, load_tokenizer)
