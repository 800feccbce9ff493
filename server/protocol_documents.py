"""Request and response models of `/v1/documents` (a CacheBlend extension, no OpenAI API).

Requests refuse unknown fields (400): no OpenAI client sends them, so a misspelt option is a
mistake to report, not a compatibility field to ignore. Strings must be valid Unicode, as in
every request (the validator of `OpenAIBaseModel`).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import ConfigDict, Field

from server.protocol import CacheBlendInfo, CacheBlendParams, OpenAIBaseModel, UsageInfo


class DocumentRequest(OpenAIBaseModel):
    model_config = ConfigDict(extra="forbid")


class DocumentCreateRequest(DocumentRequest):
    """A long text, split on token boundaries into pieces whose KV is precomputed."""
    text: str = Field(min_length=1)
    model: Optional[str] = None
    chunk_tokens: Optional[int] = Field(None, ge=1)    # default: settings.document_chunk_tokens
    overlap_tokens: Optional[int] = Field(None, ge=0)  # default: settings.document_overlap_tokens
    stream: bool = False                               # SSE progress events, then the document


class DocumentAnalyzeRequest(DocumentRequest):
    """One question over windows of `window` consecutive pieces, `stride` pieces apart."""
    question: str = Field(min_length=1)
    model: Optional[str] = None
    window: int = Field(4, ge=1)
    stride: Optional[int] = Field(None, ge=1)  # default: window (windows do not overlap)
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    reduce: bool = False  # one more request answering from the window answers
    cacheblend: Optional[CacheBlendParams] = None


class DocumentObject(OpenAIBaseModel):
    id: str
    object: Literal["document"] = "document"
    created: int
    characters: int
    tokens: int
    chunk_tokens: int
    overlap_tokens: int
    chunks: list[str]  # the pieces' chunk IDs, in document order


class DocumentProgress(OpenAIBaseModel):
    object: Literal["document.progress"] = "document.progress"
    pieces_done: int
    pieces_total: int


class DocumentList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[DocumentObject]
    has_more: bool


class DocumentDeleted(OpenAIBaseModel):
    id: str
    object: Literal["document"] = "document"
    deleted: bool = True


class WindowAnswer(OpenAIBaseModel):
    index: int
    first_chunk: int  # piece indices, both included
    last_chunk: int
    answer: str
    usage: UsageInfo
    cacheblend: CacheBlendInfo


class DocumentAnalysis(OpenAIBaseModel):
    object: Literal["document.analysis"] = "document.analysis"
    document: str
    model: str
    windows: list[WindowAnswer]
    answer: Optional[str] = None  # the reduce step's, when asked for
    usage: UsageInfo              # all windows and the reduce step together
