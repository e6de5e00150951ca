"""The explorer's routes: a run's error collapse over steps, its prompts ranked by collapse, one prompt's
clusters over steps, and the page itself at `/ui` (static files of the package, no CDN).

Aggregation and paging happen here on the server (engine/summary.py): the page never loads a run's rollouts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles

from ..engine.summary import SORTS, CollapseViews, prompt_collapse
from .auth import PUBLIC, access
from .routes import ERRORS, EngineDep, PromptId, RunName, json_response

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
MAX_PAGE = 500
TAG = "explorer"  # read-only views for the page and for people; the SDK has no methods for them


class CollapseSeries(BaseModel):
    """One entry per training step that stored wrong vectors, aligned across the lists."""

    step: list[int]
    wrong_rollouts: list[int] = Field(description="Fitted wrong vectors stored at the step.")
    prompts: list[int] = Field(description="Prompts with such vectors at the step.")
    repeat_rate: list[float] = Field(description="Share of them in a cluster seen at an earlier step.")
    distinct_error_clusters: list[float] = Field(description="Clusters of a prompt's vectors of the step, averaged.")
    largest_cluster_share: list[float] = Field(description="The largest cluster's share of them, averaged.")
    cluster_entropy: list[float] = Field(description="Entropy (nats) of their spread, noise as singletons, averaged.")
    noise_share: list[float] = Field(description="Share of the step's vectors labelled noise.")


class SummaryResponse(BaseModel):
    run: str
    prompts: int = Field(description="Prompts with wrong vectors in memory.")
    wrong_vectors: int = Field(description="Fitted wrong vectors (the table the series are computed from).")
    unstepped_vectors: int = Field(description="Of them, stored without a step (left out of the series).")
    series: CollapseSeries


class PromptRow(BaseModel):
    prompt_id: str
    fitted: int = Field(description="Wrong vectors covered by the prompt's last fit.")
    vectors: int = Field(description="Wrong vectors the prompt holds.")
    pending_refit: bool
    clusters: int
    largest_cluster_share: float
    cluster_entropy: float
    noise_share: float
    first_step: int | None
    last_step: int | None


class PromptPage(BaseModel):
    run: str
    sort: str
    offset: int
    limit: int
    total: int = Field(description="Prompts with wrong vectors in memory.")
    prompts: list[PromptRow]


class PenaltyHistogram(BaseModel):
    zero: int = Field(description="Rollouts with penalty 0.")
    edges: list[float] = Field(description="Bin edges over [0, max(beta, largest penalty)].")
    counts: list[int] = Field(description="Rollouts with a positive penalty per bin.")


class ClusterOverSteps(BaseModel):
    size: int
    sizes: list[int] = Field(description="Vectors of the cluster per step of `steps`.")
    first_step: int | None
    last_step: int | None
    examples: list[str] = Field(description="A few of its rollouts' texts, newest first (runs that keep texts).")


class GroupCollapse(BaseModel):
    vectors: int
    fitted: int
    pending_refit: bool
    noise_share: float = Field(description="Share of the fitted vectors labelled noise.")
    rollouts: int = Field(description="Rollouts of the group ever scored (their results are stored).")
    penalties: PenaltyHistogram
    steps: list[int]
    clusters: dict[str, ClusterOverSteps] = Field(description="Label (-1 = noise) -> its size over steps.")


class PromptCollapseResponse(BaseModel):
    run: str
    prompt_id: str
    groups: dict[str, GroupCollapse]


def views_of(request: Request) -> CollapseViews:
    return request.app.state.views  # type: ignore[no-any-return]


ViewsDep = Annotated[CollapseViews, Depends(views_of)]

# Every explorer view reads one run.
explorer = APIRouter(prefix="/v1", tags=[TAG], dependencies=[access("read")], responses=ERRORS)


@explorer.get("/runs/{run}/summary", response_model=SummaryResponse, summary="A run's error collapse per training step")
async def run_summary(run: RunName, views: ViewsDep) -> Response:
    return json_response(await run_in_threadpool(views.summary, run))


@explorer.get(
    "/runs/{run}/prompts", response_model=PromptPage, summary="A run's prompts ranked by error collapse, one page"
)
async def ranked_prompts(
    run: RunName,
    views: ViewsDep,
    sort: Annotated[str, Query(description=f"One of {', '.join(SORTS)}.", json_schema_extra={"enum": list(SORTS)})] = (
        "collapse"
    ),
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> Response:
    return json_response(await run_in_threadpool(views.ranked, run, sort, offset, limit))


@explorer.get(
    "/runs/{run}/collapse/{prompt_id:path}",
    response_model=PromptCollapseResponse,
    summary="One prompt's clusters over steps and penalties",
)
async def prompt_view(run: RunName, prompt_id: PromptId, engine: EngineDep) -> Response:
    return json_response(await run_in_threadpool(prompt_collapse, engine, run, prompt_id))


page = APIRouter(dependencies=[PUBLIC])  # the page's own files; its data comes from the routes above


@page.get("/ui", include_in_schema=False)
async def explorer_page() -> FileResponse:
    return FileResponse(UI_DIR / "index.html", media_type="text/html")


def ui_assets() -> StaticFiles:
    return StaticFiles(directory=UI_DIR)
