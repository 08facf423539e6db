"""The HTTP schema of the endpoint: what ``/v1/predict`` accepts and what every route answers.

The constraints live in the types so that the OpenAPI document says exactly what is accepted (a client or a
fuzzer generating from it never gets a 422 for a schema-valid body). The one limit that is not in the schema
is the number of inputs, which is set per deployment and answered with 413.
"""
from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

__all__ = ["PredictRequest", "Prediction", "PredictResponse", "ModelRef", "ModelInfo", "Health", "ErrorBody"]


def _utf8(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); the tokenizer cannot take them, so refuse them here (422).
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (it contains a lone surrogate)") from None
    return text


Text = Annotated[str, Field(min_length=1, pattern=r"\S", description="a non-blank text"), AfterValidator(_utf8)]
Pair = Annotated[list[Text], Field(min_length=2, max_length=2, description="a sentence pair: [first, second]")]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "examples": [{"inputs": ["a gripping, funny film"]}, {"inputs": [["a man is eating", "someone eats"]]}]})

    inputs: list[Union[Text, Pair]] = Field(
        min_length=1, description="texts, or sentence pairs; at most the deployment's max_inputs (else 413); "
                                  "texts longer than the model's max length are truncated")


class Prediction(BaseModel):
    label: str
    score: float = Field(description="softmax probability of the label")


class ModelRef(BaseModel):
    job: Optional[str] = None
    trial: Optional[str] = None


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    model: ModelRef


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    job: Optional[str] = None
    trial: Optional[str] = None
    artifact: str
    labels: list[str] = Field(description="the class names, in class-index order")
    pairs: Optional[bool] = Field(None, description="true: the model takes sentence pairs, false: single texts; "
                                                    "null: either (an artifact that does not record its task)")
    max_length: int
    size_bytes: Optional[int] = Field(None, description="bytes on disk of what is served: model.safetensors + "
                                                         "config.json (torch), model.onnx (onnxruntime)")
    teacher: Optional[Any] = None
    trial_config: Optional[dict] = None
    metrics: Optional[dict] = None
    promoted_at: Optional[str] = None
    promoted_by: Optional[str] = None
    serving: dict = Field(description="max_batch_size, batch_wait_timeout_s, max_inputs, auth, torch_threads, ptq, "
                                        "runtime (torch or onnxruntime)")
    deploy_info: dict = Field(default_factory=dict, description="what promotion recorded (baseline, constraints)")
    provenance: dict = Field(default_factory=dict, description="the artifact's slimray.json")


class Health(BaseModel):
    status: str


class ErrorBody(BaseModel):
    error: str = Field(description="one line: what was wrong and what to do")
    detail: Optional[Any] = None
