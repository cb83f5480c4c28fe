from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TeacherInfo(_message.Message):
    __slots__ = ("name", "addresses", "model_id", "tokenizer_fingerprint", "vocab_size", "max_k", "ready")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    name: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    model_id: str
    tokenizer_fingerprint: str
    vocab_size: int
    max_k: int
    ready: bool
    def __init__(self, name: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., model_id: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_k: _Optional[int] = ..., ready: _Optional[bool] = ...) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("target_tokenizer", "target_fingerprint", "target_vocab_size", "teachers", "default_k", "default_options_json", "max_block_tokens", "max_texts")
    TARGET_TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    TARGET_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TARGET_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_K_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXTS_FIELD_NUMBER: _ClassVar[int]
    target_tokenizer: str
    target_fingerprint: str
    target_vocab_size: int
    teachers: _containers.RepeatedCompositeFieldContainer[TeacherInfo]
    default_k: int
    default_options_json: str
    max_block_tokens: int
    max_texts: int
    def __init__(self, target_tokenizer: _Optional[str] = ..., target_fingerprint: _Optional[str] = ..., target_vocab_size: _Optional[int] = ..., teachers: _Optional[_Iterable[_Union[TeacherInfo, _Mapping]]] = ..., default_k: _Optional[int] = ..., default_options_json: _Optional[str] = ..., max_block_tokens: _Optional[int] = ..., max_texts: _Optional[int] = ...) -> None: ...

class FuseRequest(_message.Message):
    __slots__ = ("id", "texts", "k", "preset", "options_json", "teachers", "float_dtype", "token_ids")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    FLOAT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    k: int
    preset: str
    options_json: str
    teachers: _containers.RepeatedScalarFieldContainer[str]
    float_dtype: str
    token_ids: _containers.RepeatedCompositeFieldContainer[TokenIds]
    def __init__(self, id: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., preset: _Optional[str] = ..., options_json: _Optional[str] = ..., teachers: _Optional[_Iterable[str]] = ..., float_dtype: _Optional[str] = ..., token_ids: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class FusedBlock(_message.Message):
    __slots__ = ("id", "index", "block", "cache_hit", "teachers", "ce", "coverage", "target_fingerprint")
    ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    CE_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    id: str
    index: int
    block: bytes
    cache_hit: bool
    teachers: _containers.RepeatedScalarFieldContainer[str]
    ce: _containers.RepeatedScalarFieldContainer[float]
    coverage: _containers.RepeatedScalarFieldContainer[float]
    target_fingerprint: str
    def __init__(self, id: _Optional[str] = ..., index: _Optional[int] = ..., block: _Optional[bytes] = ..., cache_hit: _Optional[bool] = ..., teachers: _Optional[_Iterable[str]] = ..., ce: _Optional[_Iterable[float]] = ..., coverage: _Optional[_Iterable[float]] = ..., target_fingerprint: _Optional[str] = ...) -> None: ...

class FuseReply(_message.Message):
    __slots__ = ("blocks",)
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[FusedBlock]
    def __init__(self, blocks: _Optional[_Iterable[_Union[FusedBlock, _Mapping]]] = ...) -> None: ...
