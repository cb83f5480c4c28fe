from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TooLong(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOO_LONG_REJECT: _ClassVar[TooLong]
    TOO_LONG_TRUNCATE: _ClassVar[TooLong]

class AddBos(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADD_BOS_AUTO: _ClassVar[AddBos]
    ADD_BOS_ALWAYS: _ClassVar[AddBos]
    ADD_BOS_NEVER: _ClassVar[AddBos]
TOO_LONG_REJECT: TooLong
TOO_LONG_TRUNCATE: TooLong
ADD_BOS_AUTO: AddBos
ADD_BOS_ALWAYS: AddBos
ADD_BOS_NEVER: AddBos

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("model_id", "revision", "architecture", "tokenizer_fingerprint", "vocab_size", "max_sequence_length", "max_k", "dtype", "device", "backend", "tokenizer_scheme", "max_batch_texts", "max_request_tokens", "special_ids", "bos_id", "eos_id", "unk_id", "pad_id")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_SCHEME_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TEXTS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_IDS_FIELD_NUMBER: _ClassVar[int]
    BOS_ID_FIELD_NUMBER: _ClassVar[int]
    EOS_ID_FIELD_NUMBER: _ClassVar[int]
    UNK_ID_FIELD_NUMBER: _ClassVar[int]
    PAD_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    revision: str
    architecture: str
    tokenizer_fingerprint: str
    vocab_size: int
    max_sequence_length: int
    max_k: int
    dtype: str
    device: str
    backend: str
    tokenizer_scheme: str
    max_batch_texts: int
    max_request_tokens: int
    special_ids: _containers.RepeatedScalarFieldContainer[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    def __init__(self, model_id: _Optional[str] = ..., revision: _Optional[str] = ..., architecture: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_sequence_length: _Optional[int] = ..., max_k: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., backend: _Optional[str] = ..., tokenizer_scheme: _Optional[str] = ..., max_batch_texts: _Optional[int] = ..., max_request_tokens: _Optional[int] = ..., special_ids: _Optional[_Iterable[int]] = ..., bos_id: _Optional[int] = ..., eos_id: _Optional[int] = ..., unk_id: _Optional[int] = ..., pad_id: _Optional[int] = ...) -> None: ...

class VocabRequest(_message.Message):
    __slots__ = ("chunk_size",)
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    chunk_size: int
    def __init__(self, chunk_size: _Optional[int] = ...) -> None: ...

class VocabChunk(_message.Message):
    __slots__ = ("start_id", "tokens", "vocab_size")
    START_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    start_id: int
    tokens: _containers.RepeatedScalarFieldContainer[str]
    vocab_size: int
    def __init__(self, start_id: _Optional[int] = ..., tokens: _Optional[_Iterable[str]] = ..., vocab_size: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("texts", "k", "too_long", "add_bos", "float_dtype")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    TOO_LONG_FIELD_NUMBER: _ClassVar[int]
    ADD_BOS_FIELD_NUMBER: _ClassVar[int]
    FLOAT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    k: int
    too_long: TooLong
    add_bos: AddBos
    float_dtype: str
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., too_long: _Optional[_Union[TooLong, str]] = ..., add_bos: _Optional[_Union[AddBos, str]] = ..., float_dtype: _Optional[str] = ...) -> None: ...

class ScoreReply(_message.Message):
    __slots__ = ("index", "scores", "truncated", "num_tokens")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    index: int
    scores: bytes
    truncated: bool
    num_tokens: int
    def __init__(self, index: _Optional[int] = ..., scores: _Optional[bytes] = ..., truncated: _Optional[bool] = ..., num_tokens: _Optional[int] = ...) -> None: ...
