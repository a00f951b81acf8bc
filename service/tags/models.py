"""The `tags` and `task_tags` tables and the tag endpoints' request and response models."""

from __future__ import annotations

from datetime import datetime

from pydantic import ConfigDict
from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    PrimaryKeyConstraint,
    String,
    UniqueConstraint,
    text,
)
from sqlmodel import Field, SQLModel

from service.limits import USER_ID_MAX
from service.sqltypes import ID_TYPE, UTCDateTime
from service.tags.rules import TAG_NAME_MAX, TagName

# A user's tag names are unique by PostgreSQL's lower(); a rename that breaks it is a 409.
UNIQUE_NAME_INDEX = "uq_tags_user_name"


class Tag(SQLModel, table=True):
    """A user's tag. `Work` and `work` are one tag: unique on the lower-cased name."""

    __tablename__ = "tags"
    __table_args__ = (
        UniqueConstraint("id", "user_id", name="uq_tags_id_user"),  # target of task_tags' FK
        Index(UNIQUE_NAME_INDEX, "user_id", text("lower(name)"), unique=True),
    )

    id: int | None = Field(
        default=None, sa_column=Column(ID_TYPE, Identity(always=False), primary_key=True)
    )
    user_id: str = Field(
        sa_column=Column(
            String(USER_ID_MAX), ForeignKey("users.id", name="fk_tags_user"), nullable=False
        )
    )
    name: str = Field(sa_column=Column(String(TAG_NAME_MAX), nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class TaskTag(SQLModel, table=True):
    """A tag on a task. `user_id` is in both foreign keys, so a task can only carry its own
    user's tags; deleting the task or the tag deletes the link."""

    __tablename__ = "task_tags"
    __table_args__ = (
        PrimaryKeyConstraint("task_id", "tag_id"),  # the tags of a task
        Index("ix_task_tags_tag", "tag_id", "task_id"),  # the tasks with a tag
        ForeignKeyConstraint(
            ["task_id", "user_id"],
            ["tasks.id", "tasks.user_id"],
            name="fk_task_tags_task",
            ondelete="CASCADE",
        ),
        ForeignKeyConstraint(
            ["tag_id", "user_id"],
            ["tags.id", "tags.user_id"],
            name="fk_task_tags_tag",
            ondelete="CASCADE",
        ),
    )

    task_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    tag_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    user_id: str = Field(sa_column=Column(String(USER_ID_MAX), nullable=False))


class TagCreate(SQLModel):
    """Body of POST /tags."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    name: TagName


class TagUpdate(SQLModel):
    """Body of PATCH /tags/{tag_id}: the new name."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    name: TagName


class TagPublic(SQLModel):
    id: int
    name: str
    task_count: int = Field(description="How many of the user's tasks carry the tag")
    created_at: datetime
