"""The idp document-extraction platform's HTTP API (seed 000) as the client reads it: paths,
status codes, the documented messages and the pydantic wire models (the emulator has its own).

Every model allows extra fields (the platform sends many undocumented or deprecated ones)
and accepts both spellings where the seed contradicts itself (``doc_type``/``docType``);
the ``/api`` prefix of the URL table, which the examples leave out, is handled by the client.
"""

from __future__ import annotations

import json
from enum import IntEnum
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

# --- paths ---------------------------------------------------------------------------------

LOGIN_PATH = "/auth/login"
API_PREFIX = "/api"  # the URL table's; the examples call /extracting/... without it
TASK_PATH = "/extracting/v2/task"
RESULT_PATH = "/extracting/v2/{extract_id}"
HIGHLIGHT_PATH = "/extracting/v2/{extract_id}/export/highlight"

# --- messages (the seed's status tables) ---------------------------------------------------

LOGIN_OK = "登入成功"
LOGIN_FAILED = "登入失败"
VALIDATION_ERROR = "参数校验出错"
LOGIN_LOCKED = "登入失败次数太多，请稍后重试"
BAD_CREDENTIALS = "用户名或密码错误"
USER_DISABLED = "用户已禁用"
TASK_CREATED = "创建任务成功"
TASK_FAILED = "创建任务失败"
SYNC_ONE_FILE = "同步任务只允许上传一份文件"
ILLEGAL_FILE = "上传文件包含不合法文件,上传失败!"
OVER_LIMIT = "文件大小或页数超过上限"

# Not in the seed: what platforms of this kind answer where the seed is silent. The client
# recognises them when it meets them, and falls back on the HTTP status when it does not.
UNAUTHORIZED = "未登录或登录已失效"
RESULT_OK = "获取抽取结果成功"
EXTRACT_NOT_FOUND = "抽取记录不存在"
HIGHLIGHT_OK = "导出成功"
HIGHLIGHT_NOT_READY = "文档未抽取成功，无法导出"

# --- codes ---------------------------------------------------------------------------------

DOC_TYPE_ELECTRONIC = 1  # 电子文档
DOC_TYPE_IMAGE = 2  # 图像文档


class ExtractStatus(IntEnum):
    """``item.status``: where the platform is with one document."""

    UNPROCESSED = 0
    TEXT_CONVERT_FAILED = 2
    TEXT_CONVERTED = 3
    PRELABEL_FAILED = 4
    PRELABEL_SUCCEEDED = 5
    CONVERTING = 6
    EXTRACTING = 7
    REVIEWED = 8
    FILE_CHECK_FAILED = 20001


STATUS_NAMES: dict[int, str] = {
    ExtractStatus.UNPROCESSED: "未处理",
    ExtractStatus.TEXT_CONVERT_FAILED: "文本转换失败",
    ExtractStatus.TEXT_CONVERTED: "文本转换成功",
    ExtractStatus.PRELABEL_FAILED: "预标注失败",
    ExtractStatus.PRELABEL_SUCCEEDED: "预标注成功",
    ExtractStatus.CONVERTING: "文档转换中",
    ExtractStatus.EXTRACTING: "抽取中",
    ExtractStatus.REVIEWED: "已审核",
    ExtractStatus.FILE_CHECK_FAILED: "文件检查失败",
}
SUCCEEDED = frozenset({ExtractStatus.PRELABEL_SUCCEEDED, ExtractStatus.REVIEWED})
FAILED = frozenset({ExtractStatus.TEXT_CONVERT_FAILED, ExtractStatus.PRELABEL_FAILED, ExtractStatus.FILE_CHECK_FAILED})
FINAL = SUCCEEDED | FAILED


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


# --- login ---------------------------------------------------------------------------------


class LoginRequest(_Wire):
    """Both values are base64 of the UTF-8 text (the seed's Python example encodes them)."""

    username: str
    password: str
    verification: dict[str, Any] | None = None


class LoginResponse(_Wire):
    status: int | None = None
    message: str | None = None
    access_token: str | None = None
    refresh_token: str | None = None
    user_id: int | None = None
    nickname: str | None = None
    need_update_password: bool | None = None


class ErrorResponse(_Wire):
    """Every documented failure: ``status`` repeats the HTTP code, ``message`` is the table's text."""

    status: int | None = None
    message: str | None = None


# --- extraction result ---------------------------------------------------------------------


class Location(_Wire):
    """One place of a value, as public clients read it from ``after_treatment``."""

    page_no: int | None = None  # 0-based
    bboxes: list[list[float]] | str | None = None  # [[x0, y0, x1, y1], ...] in page points
    page_size: list[float] | str | None = None  # [width, height]


class AfterTreatment(_Wire):
    data: str | None = None
    locations: list[Location] = Field(default_factory=list)


class Tag(_Wire):
    """One ``tag_list`` entry; ``relation_extract`` values repeat this shape (possibly as ``{}``)."""

    tag_id: int | None = None
    terms_id: int | None = None
    tag_name: str | None = None
    value: str | None = None
    word: str | None = None
    confidence: float | None = None
    index: int | None = None  # character offset of the value in item.content
    color: list[int] | None = None
    after_treatment: Any = None  # null in the seed; JSON text of AfterTreatment on platforms that locate values
    ppr: Any = None

    def located(self) -> AfterTreatment | None:
        """``after_treatment`` parsed, when it is the JSON document some platforms put there."""
        raw = self.after_treatment
        if isinstance(raw, str) and raw.strip():
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                return None
        return AfterTreatment.model_validate(raw) if isinstance(raw, dict) else None


class RelationField(_Wire):
    id: int | None = None
    name: str | None = None
    type: str | None = None  # "tag"
    value: list[Tag] = Field(default_factory=list)


class RelationRow(_Wire):
    children: list[RelationField] = Field(default_factory=list)
    confidence: float | None = None
    type: str | None = None  # "card"


class RelationGroup(_Wire):
    id: int | None = None
    name: str | None = None
    node_index: int | None = None
    type: str | None = None  # "group"
    children: list[RelationRow] = Field(default_factory=list)


class ExtractResult(_Wire):
    status: str | None = None  # "OK" or "ERROR"
    doc_prob: float | None = None
    pdf_path: str | None = None
    fuzzy_tag_list: list[Any] | None = None
    tag_list: list[Tag] = Field(default_factory=list)
    relation_extract: list[RelationGroup] = Field(default_factory=list)


# --- task creation -------------------------------------------------------------------------


class TaskItem(_Wire):
    """``items[*]`` of a task creation: ``id`` is the extract id that ``GET .../{extract_id}`` takes."""

    id: int | None = None
    extract_task_id: int
    origin_name: str
    unique_name: str
    create_time: str | None = None
    last_update_time: str | None = None
    extract_version: int | None = None
    idps_version: int | None = None
    field_level: Any = None
    global_level: str | None = None
    graph_define_level: Any = None
    is_saved_by_business: bool | None = None
    origin_file: str | None = None
    relation_extract_result: Any = None


class CreateTaskResponse(_Wire):
    status: int | None = None
    message: str | None = None
    ids: list[int] | None = None  # deprecated: the ids are in items
    items: list[TaskItem] = Field(default_factory=list)
    total: int | None = None
    # Synchronous tasks also answer the document's result:
    name: str | None = None
    content: str | None = None
    result: ExtractResult | None = None

    @property
    def extract_ids(self) -> list[int]:
        """The extract ids, from ``items`` (documented) or else the deprecated ``ids``."""
        from_items = [item.id for item in self.items if item.id is not None]
        return from_items or list(self.ids or [])


# --- extraction state ----------------------------------------------------------------------


class ExtractItem(_Wire):
    id: int | None = None
    extract_task_id: int
    origin_name: str
    unique_name: str
    name: str | None = None
    doc_name: str | None = None
    doc_type: int | None = Field(default=None, validation_alias=AliasChoices("doc_type", "docType"))
    status: int | None = None
    status_name: str | None = None
    content: str | None = None
    result: ExtractResult | None = None
    create_time: str | None = None
    last_update_time: str | None = None
    extract_version: int | None = None
    idps_version: int | None = None
    language: str | None = None
    tag_type_id: int | None = None
    field_level: Any = None
    global_level: str | None = None
    graph_define_level: Any = None
    is_saved_by_business: bool | None = None
    origin_file: str | None = None
    feedback: bool | None = None
    img_path: str | None = None
    enable_img_render: bool | None = None
    support_img_render_selection: bool | None = None
    rich_content_file_name: str | None = None
    ocr_extract_type: str | None = None
    shortcut: list[dict[str, Any]] | None = None

    @field_validator("result", mode="before")
    @classmethod
    def _empty_result(cls, value: Any) -> Any:
        """Unfinished documents may carry ``{}`` or ``""`` instead of null."""
        return value or None

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @property
    def succeeded(self) -> bool:
        return self.status in SUCCEEDED


class GetResultResponse(_Wire):
    code: int | None = None
    status: int | None = None
    message: str | None = None
    item: ExtractItem | None = None


# --- highlight export ----------------------------------------------------------------------


class HighlightItem(_Wire):
    """The seed says only "文件名，下载地址": the usual spellings of both are accepted."""

    file_name: str | None = Field(default=None, validation_alias=AliasChoices("file_name", "filename", "name"))
    url: str | None = Field(default=None, validation_alias=AliasChoices("url", "download_url", "file_url", "path"))


class HighlightResponse(_Wire):
    code: int | None = None
    status: int | None = None
    message: str | None = None
    item: HighlightItem | None = None
