from modalign.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("text", "images", "sampling", "n", "user_id", "session_id", "conversation", "audio")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    text: str
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    sampling: _common_pb2.SamplingParams
    n: int
    user_id: str
    session_id: str
    conversation: _containers.RepeatedCompositeFieldContainer[_common_pb2.Message]
    audio: _common_pb2.Audio
    def __init__(self, text: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., n: _Optional[int] = ..., user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., conversation: _Optional[_Iterable[_Union[_common_pb2.Message, _Mapping]]] = ..., audio: _Optional[_Union[_common_pb2.Audio, _Mapping]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("response_id", "text", "token_count", "finish_reason")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    text: str
    token_count: int
    finish_reason: _common_pb2.FinishReason
    def __init__(self, response_id: _Optional[str] = ..., text: _Optional[str] = ..., token_count: _Optional[int] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("prompt_id", "policy_version", "candidates")
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    prompt_id: str
    policy_version: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    def __init__(self, prompt_id: _Optional[str] = ..., policy_version: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ...) -> None: ...

class GenerateStreamChunk(_message.Message):
    __slots__ = ("prompt_id", "policy_version", "candidate_index", "response_id", "text_delta", "token_count", "finish_reason")
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_INDEX_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    prompt_id: str
    policy_version: str
    candidate_index: int
    response_id: str
    text_delta: str
    token_count: int
    finish_reason: _common_pb2.FinishReason
    def __init__(self, prompt_id: _Optional[str] = ..., policy_version: _Optional[str] = ..., candidate_index: _Optional[int] = ..., response_id: _Optional[str] = ..., text_delta: _Optional[str] = ..., token_count: _Optional[int] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ...) -> None: ...
