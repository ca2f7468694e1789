"""Request and response bodies of the REST API and the `control` messages, as pydantic models.

Everything a client sends is validated here, with unknown fields refused, so a typo is an error
that names the field rather than a silently ignored setting.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 2000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WeightedPromptItem(Strict):
    text: str = Field(max_length=MAX_PROMPT_CHARS)
    weight: float = Field(gt=0, le=100)


Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | Annotated[
    list[WeightedPromptItem], Field(min_length=1, max_length=8)]


class SLOBody(Strict):
    ttff_ms: float | None = Field(None, gt=0, le=120_000, description="time to first frame")
    min_steps: int | None = Field(None, ge=1, le=8, description="may drop denoising steps down to this")
    min_fps: float | None = Field(None, gt=0, le=120, description="may drop frame rate down to this")


class SessionCreate(Strict):
    mode: Literal["t2v", "v2v"] = "t2v"
    prompt: Prompt = ""
    seed: int = Field(0, ge=0, le=2**63 - 1)
    steps: int | None = Field(None, ge=1, le=8, description="denoising steps (default: the sampler's)")
    fps: float | None = Field(None, gt=0, le=120, description="output frame rate (default: the model's)")
    resolution: str | None = Field(None, pattern=r"^[1-9][0-9]{1,4}x[1-9][0-9]{1,4}$",
                                   description="WIDTHxHEIGHT; only the worker's resolution is served")
    slo: SLOBody = Field(default_factory=SLOBody)
    max_duration_s: float | None = Field(None, gt=0, le=86_400)

    def size(self) -> tuple[int, int] | None:
        if self.resolution is None:
            return None
        w, h = self.resolution.split("x")
        return int(w), int(h)


class SessionCreated(BaseModel):
    session_id: str
    state: Literal["active", "queued"]
    queue_position: int | None = None
    estimated_wait_s: float | None = None
    offer_url: str
    ws_url: str
    events_url: str
    fps: float
    steps: int
    resolution: str
    degraded: list[dict[str, object]] = Field(default_factory=list)


class Offer(Strict):
    sdp: str = Field(min_length=1, max_length=64_000)
    type: Literal["offer"]


class OneShotOffer(Offer):
    session: SessionCreate = Field(default_factory=SessionCreate)


class Answer(BaseModel):
    sdp: str
    type: Literal["answer"] = "answer"
    session_id: str


class ParamsUpdate(Strict):
    prompt: Prompt | None = None
    transition_blocks: int = Field(0, ge=0, le=64, description="blend into the new prompt over N blocks")
    steps: int | None = Field(None, ge=1, le=8)
    paused: bool | None = None


class ErrorBody(BaseModel):
    error: str  # a stable machine-readable code
    message: str  # for people


# -- data channel / WebSocket control messages ---------------------------------------------------


class ParamsUpdateMessage(Strict):
    type: Literal["params.update"]
    id: str | int | None = None
    params: ParamsUpdate


class PromptTransitionMessage(Strict):
    type: Literal["prompt.transition"]
    id: str | int | None = None
    prompt: Prompt
    blocks: int = Field(ge=1, le=64)


class SimpleMessage(Strict):
    type: Literal["cache.reset", "pause", "resume", "ping", "frames.subscribe"]
    id: str | int | None = None


ControlMessage = Annotated[ParamsUpdateMessage | PromptTransitionMessage | SimpleMessage,
                           Field(discriminator="type")]


class ControlEnvelope(Strict):
    message: ControlMessage

    @field_validator("message", mode="before")
    @classmethod
    def _dict(cls, v: object) -> object:
        if not isinstance(v, dict):
            raise ValueError("a control message is a JSON object with a 'type'")
        return v
