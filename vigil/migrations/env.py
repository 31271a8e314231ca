"""Alembic environment: migrate the store given by the caller's connection, the ini's URL, or the settings.

``vigil.store.upgrade`` passes its own connection (so SQLite gets vigil's pragmas) and asks us not to touch logging.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from vigil.settings import Settings
from vigil.store import Base, engine_for

config = context.config
if config.config_file_name and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def store_url() -> str:
    return config.get_main_option("sqlalchemy.url") or Settings().store_url


def run_offline() -> None:
    """``alembic upgrade --sql``: write the DDL for a DBA instead of running it."""
    context.configure(url=store_url(), target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        migrate(connection)
        return
    engine = engine_for(store_url())
    try:
        with engine.begin() as connection:
            migrate(connection)
    finally:
        engine.dispose()


def migrate(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
