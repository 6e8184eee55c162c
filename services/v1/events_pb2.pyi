import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from modalign.v1 import common_pb2 as _common_pb2
from modalign.v1 import feedback_pb2 as _feedback_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RolloutPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLLOUT_PHASE_UNSPECIFIED: _ClassVar[RolloutPhase]
    ROLLOUT_PHASE_PROGRESSING: _ClassVar[RolloutPhase]
    ROLLOUT_PHASE_PAUSED: _ClassVar[RolloutPhase]
    ROLLOUT_PHASE_PROMOTED: _ClassVar[RolloutPhase]
    ROLLOUT_PHASE_ROLLED_BACK: _ClassVar[RolloutPhase]
ROLLOUT_PHASE_UNSPECIFIED: RolloutPhase
ROLLOUT_PHASE_PROGRESSING: RolloutPhase
ROLLOUT_PHASE_PAUSED: RolloutPhase
ROLLOUT_PHASE_PROMOTED: RolloutPhase
ROLLOUT_PHASE_ROLLED_BACK: RolloutPhase

class GenerationLogged(_message.Message):
    __slots__ = ("response_id", "prompt_id", "policy_version", "user_id", "session_id", "prompt_text", "images", "sampling", "candidate_index", "num_candidates", "prompt_token_ids", "response_token_ids", "response_logprobs", "response_text", "finish_reason", "created_at", "conversation")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    prompt_id: str
    policy_version: str
    user_id: str
    session_id: str
    prompt_text: str
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.ImageRef]
    sampling: _common_pb2.SamplingParams
    candidate_index: int
    num_candidates: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    response_token_ids: _containers.RepeatedScalarFieldContainer[int]
    response_logprobs: _containers.RepeatedScalarFieldContainer[float]
    response_text: str
    finish_reason: _common_pb2.FinishReason
    created_at: _timestamp_pb2.Timestamp
    conversation: _containers.RepeatedCompositeFieldContainer[_common_pb2.LoggedMessage]
    def __init__(self, response_id: _Optional[str] = ..., prompt_id: _Optional[str] = ..., policy_version: _Optional[str] = ..., user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_common_pb2.ImageRef, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., candidate_index: _Optional[int] = ..., num_candidates: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., response_token_ids: _Optional[_Iterable[int]] = ..., response_logprobs: _Optional[_Iterable[float]] = ..., response_text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., conversation: _Optional[_Iterable[_Union[_common_pb2.LoggedMessage, _Mapping]]] = ...) -> None: ...

class FeedbackReceived(_message.Message):
    __slots__ = ("feedback", "received_at", "content_sha256")
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    feedback: _feedback_pb2.Feedback
    received_at: _timestamp_pb2.Timestamp
    content_sha256: str
    def __init__(self, feedback: _Optional[_Union[_feedback_pb2.Feedback, _Mapping]] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., content_sha256: _Optional[str] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("source_topic", "source_partition", "source_offset", "source_value", "reason", "dead_lettered_at")
    SOURCE_TOPIC_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PARTITION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VALUE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERED_AT_FIELD_NUMBER: _ClassVar[int]
    source_topic: str
    source_partition: int
    source_offset: int
    source_value: bytes
    reason: str
    dead_lettered_at: _timestamp_pb2.Timestamp
    def __init__(self, source_topic: _Optional[str] = ..., source_partition: _Optional[int] = ..., source_offset: _Optional[int] = ..., source_value: _Optional[bytes] = ..., reason: _Optional[str] = ..., dead_lettered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PartitionOffset(_message.Message):
    __slots__ = ("topic", "partition", "offset")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    topic: str
    partition: int
    offset: int
    def __init__(self, topic: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class OffsetRange(_message.Message):
    __slots__ = ("topic", "partition", "start", "end")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    topic: str
    partition: int
    start: int
    end: int
    def __init__(self, topic: _Optional[str] = ..., partition: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class PolicyVersionPublished(_message.Message):
    __slots__ = ("version", "parent_version", "uri", "manifest_sha256", "algorithm", "trained_through", "eval_metrics", "published_at", "reward_model_version", "passed_over")
    class EvalMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    TRAINED_THROUGH_FIELD_NUMBER: _ClassVar[int]
    EVAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PASSED_OVER_FIELD_NUMBER: _ClassVar[int]
    version: str
    parent_version: str
    uri: str
    manifest_sha256: str
    algorithm: str
    trained_through: _containers.RepeatedCompositeFieldContainer[PartitionOffset]
    eval_metrics: _containers.ScalarMap[str, float]
    published_at: _timestamp_pb2.Timestamp
    reward_model_version: str
    passed_over: _containers.RepeatedCompositeFieldContainer[OffsetRange]
    def __init__(self, version: _Optional[str] = ..., parent_version: _Optional[str] = ..., uri: _Optional[str] = ..., manifest_sha256: _Optional[str] = ..., algorithm: _Optional[str] = ..., trained_through: _Optional[_Iterable[_Union[PartitionOffset, _Mapping]]] = ..., eval_metrics: _Optional[_Mapping[str, float]] = ..., published_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reward_model_version: _Optional[str] = ..., passed_over: _Optional[_Iterable[_Union[OffsetRange, _Mapping]]] = ...) -> None: ...

class RolloutState(_message.Message):
    __slots__ = ("revision", "stable_version", "canary_version", "canary_weight_percent", "step_index", "phase", "reason", "updated_at", "pinned_version", "rollout_started_at", "step_started_at", "policy_versions_offset", "verdicts", "changed_by")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    STABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_WEIGHT_PERCENT_FIELD_NUMBER: _ClassVar[int]
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    PINNED_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    STEP_STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSIONS_OFFSET_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    CHANGED_BY_FIELD_NUMBER: _ClassVar[int]
    revision: int
    stable_version: str
    canary_version: str
    canary_weight_percent: int
    step_index: int
    phase: RolloutPhase
    reason: str
    updated_at: _timestamp_pb2.Timestamp
    pinned_version: str
    rollout_started_at: _timestamp_pb2.Timestamp
    step_started_at: _timestamp_pb2.Timestamp
    policy_versions_offset: int
    verdicts: _containers.RepeatedCompositeFieldContainer[AnalysisVerdict]
    changed_by: str
    def __init__(self, revision: _Optional[int] = ..., stable_version: _Optional[str] = ..., canary_version: _Optional[str] = ..., canary_weight_percent: _Optional[int] = ..., step_index: _Optional[int] = ..., phase: _Optional[_Union[RolloutPhase, str]] = ..., reason: _Optional[str] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., pinned_version: _Optional[str] = ..., rollout_started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., step_started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., policy_versions_offset: _Optional[int] = ..., verdicts: _Optional[_Iterable[_Union[AnalysisVerdict, _Mapping]]] = ..., changed_by: _Optional[str] = ...) -> None: ...

class AnalysisVerdict(_message.Message):
    __slots__ = ("metric", "outcome", "canary_samples", "stable_samples", "canary_value", "stable_value", "statistic", "p_value", "threshold", "ties")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    CANARY_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STABLE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CANARY_VALUE_FIELD_NUMBER: _ClassVar[int]
    STABLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TIES_FIELD_NUMBER: _ClassVar[int]
    metric: str
    outcome: str
    canary_samples: int
    stable_samples: int
    canary_value: float
    stable_value: float
    statistic: float
    p_value: float
    threshold: float
    ties: int
    def __init__(self, metric: _Optional[str] = ..., outcome: _Optional[str] = ..., canary_samples: _Optional[int] = ..., stable_samples: _Optional[int] = ..., canary_value: _Optional[float] = ..., stable_value: _Optional[float] = ..., statistic: _Optional[float] = ..., p_value: _Optional[float] = ..., threshold: _Optional[float] = ..., ties: _Optional[int] = ...) -> None: ...
