import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Feedback(_message.Message):
    __slots__ = ("feedback_id", "user_id", "client_time", "reason", "preference", "rating", "edit", "tie")
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TIME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PREFERENCE_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    EDIT_FIELD_NUMBER: _ClassVar[int]
    TIE_FIELD_NUMBER: _ClassVar[int]
    feedback_id: str
    user_id: str
    client_time: _timestamp_pb2.Timestamp
    reason: str
    preference: Preference
    rating: Rating
    edit: Edit
    tie: Tie
    def __init__(self, feedback_id: _Optional[str] = ..., user_id: _Optional[str] = ..., client_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., preference: _Optional[_Union[Preference, _Mapping]] = ..., rating: _Optional[_Union[Rating, _Mapping]] = ..., edit: _Optional[_Union[Edit, _Mapping]] = ..., tie: _Optional[_Union[Tie, _Mapping]] = ...) -> None: ...

class Preference(_message.Message):
    __slots__ = ("chosen_response_id", "rejected_response_id")
    CHOSEN_RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    REJECTED_RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    chosen_response_id: str
    rejected_response_id: str
    def __init__(self, chosen_response_id: _Optional[str] = ..., rejected_response_id: _Optional[str] = ...) -> None: ...

class Tie(_message.Message):
    __slots__ = ("first_response_id", "second_response_id")
    FIRST_RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    SECOND_RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    first_response_id: str
    second_response_id: str
    def __init__(self, first_response_id: _Optional[str] = ..., second_response_id: _Optional[str] = ...) -> None: ...

class Rating(_message.Message):
    __slots__ = ("response_id", "score")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    score: int
    def __init__(self, response_id: _Optional[str] = ..., score: _Optional[int] = ...) -> None: ...

class Edit(_message.Message):
    __slots__ = ("response_id", "edited_text")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    EDITED_TEXT_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    edited_text: str
    def __init__(self, response_id: _Optional[str] = ..., edited_text: _Optional[str] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("feedback_id", "duplicate")
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    feedback_id: str
    duplicate: bool
    def __init__(self, feedback_id: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class SubmitStreamResponse(_message.Message):
    __slots__ = ("accepted", "duplicates")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...
