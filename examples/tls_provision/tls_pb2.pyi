from google.longrunning import operations_pb2 as _operations_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ProvisionDutRequest(_message.Message):
    __slots__ = ("name", "image_path", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PATH_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    image_path: str
    request_id: str
    def __init__(self, name: _Optional[str] = ..., image_path: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ProvisionDutResponse(_message.Message):
    __slots__ = ("installed_image",)
    INSTALLED_IMAGE_FIELD_NUMBER: _ClassVar[int]
    installed_image: str
    def __init__(self, installed_image: _Optional[str] = ...) -> None: ...

class ProvisionDutMetadata(_message.Message):
    __slots__ = ("stage", "percent")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    stage: str
    percent: int
    def __init__(self, stage: _Optional[str] = ..., percent: _Optional[int] = ...) -> None: ...
