"""Alembic environment: MASS runs migrations programmatically on a connection it passes in
(``mass.access.db.migrate``); there is no alembic.ini."""

from alembic import context

from mass.access.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
