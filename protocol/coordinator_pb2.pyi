from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnrollRequest(_message.Message):
    __slots__ = ("secret", "public_key_pem", "name")
    SECRET_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    secret: str
    public_key_pem: bytes
    name: str
    def __init__(self, secret: _Optional[str] = ..., public_key_pem: _Optional[bytes] = ..., name: _Optional[str] = ...) -> None: ...

class EnrollReply(_message.Message):
    __slots__ = ("node_id", "flower_node_id", "institution", "run_id", "fleet_address", "coordinator_public_key_pem")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    FLOWER_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INSTITUTION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    FLEET_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PUBLIC_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    flower_node_id: str
    institution: str
    run_id: str
    fleet_address: str
    coordinator_public_key_pem: bytes
    def __init__(self, node_id: _Optional[int] = ..., flower_node_id: _Optional[str] = ..., institution: _Optional[str] = ..., run_id: _Optional[str] = ..., fleet_address: _Optional[str] = ..., coordinator_public_key_pem: _Optional[bytes] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("run_id", "version")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    version: int
    def __init__(self, run_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class StatementRequest(_message.Message):
    __slots__ = ("node_id", "timestamp", "signature")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    timestamp: float
    signature: bytes
    def __init__(self, node_id: _Optional[int] = ..., timestamp: _Optional[float] = ..., signature: _Optional[bytes] = ...) -> None: ...

class StatementReply(_message.Message):
    __slots__ = ("statement_json",)
    STATEMENT_JSON_FIELD_NUMBER: _ClassVar[int]
    statement_json: str
    def __init__(self, statement_json: _Optional[str] = ...) -> None: ...

class SignedTreeHead(_message.Message):
    __slots__ = ("run_id", "tree_size", "root", "issued_at", "signature")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    tree_size: int
    root: str
    issued_at: float
    signature: bytes
    def __init__(self, run_id: _Optional[str] = ..., tree_size: _Optional[int] = ..., root: _Optional[str] = ..., issued_at: _Optional[float] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ReceiptProof(_message.Message):
    __slots__ = ("receipt_json", "leaf_index", "audit_path")
    RECEIPT_JSON_FIELD_NUMBER: _ClassVar[int]
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    AUDIT_PATH_FIELD_NUMBER: _ClassVar[int]
    receipt_json: str
    leaf_index: int
    audit_path: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, receipt_json: _Optional[str] = ..., leaf_index: _Optional[int] = ..., audit_path: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ReceiptProofReply(_message.Message):
    __slots__ = ("tree_head", "proofs")
    TREE_HEAD_FIELD_NUMBER: _ClassVar[int]
    PROOFS_FIELD_NUMBER: _ClassVar[int]
    tree_head: SignedTreeHead
    proofs: _containers.RepeatedCompositeFieldContainer[ReceiptProof]
    def __init__(self, tree_head: _Optional[_Union[SignedTreeHead, _Mapping]] = ..., proofs: _Optional[_Iterable[_Union[ReceiptProof, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("view", "node_id", "since_event_id", "requester_node_id", "timestamp", "signature")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    view: str
    node_id: int
    since_event_id: int
    requester_node_id: int
    timestamp: float
    signature: bytes
    def __init__(self, view: _Optional[str] = ..., node_id: _Optional[int] = ..., since_event_id: _Optional[int] = ..., requester_node_id: _Optional[int] = ..., timestamp: _Optional[float] = ..., signature: _Optional[bytes] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class FetchBlobRequest(_message.Message):
    __slots__ = ("digest", "offset")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    digest: str
    offset: int
    def __init__(self, digest: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class BlobChunk(_message.Message):
    __slots__ = ("size", "offset", "data")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    size: int
    offset: int
    data: bytes
    def __init__(self, size: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class BlobUpload(_message.Message):
    __slots__ = ("digest", "size", "lease_nonce", "data")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LEASE_NONCE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size: int
    lease_nonce: str
    data: bytes
    def __init__(self, digest: _Optional[str] = ..., size: _Optional[int] = ..., lease_nonce: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class SubmitReplyRequest(_message.Message):
    __slots__ = ("lease_nonce", "reply")
    LEASE_NONCE_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    lease_nonce: str
    reply: bytes
    def __init__(self, lease_nonce: _Optional[str] = ..., reply: _Optional[bytes] = ...) -> None: ...

class SubmitReplyReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NextWorkRequest(_message.Message):
    __slots__ = ("after_nonce",)
    AFTER_NONCE_FIELD_NUMBER: _ClassVar[int]
    after_nonce: str
    def __init__(self, after_nonce: _Optional[str] = ...) -> None: ...

class NextWorkReply(_message.Message):
    __slots__ = ("work", "retry_after_s")
    WORK_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    work: bytes
    retry_after_s: float
    def __init__(self, work: _Optional[bytes] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class PutBlobReply(_message.Message):
    __slots__ = ("size",)
    SIZE_FIELD_NUMBER: _ClassVar[int]
    size: int
    def __init__(self, size: _Optional[int] = ...) -> None: ...
