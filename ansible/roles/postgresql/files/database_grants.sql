-- Database and schema privileges of the falcon database (postgresql role, tasks/configure.yml).
-- Run by psql as postgres with --set=database=... --set=owner_role=... --set=writer_role=...;
-- tests/integration/test_postgres_grants.py runs this very file against a real PostgreSQL.
-- Each change prints a NOTICE starting with "ansible-changed", which is how the task
-- reports changed; a second run changes and prints nothing.
-- NOTE: psql does not expand :'variables' inside dollar quotes, so the names travel in
-- custom settings, and format('%I') quotes them as identifiers.
SET client_min_messages = notice;
SET falcon.database = :'database';
SET falcon.owner_role = :'owner_role';
SET falcon.writer_role = :'writer_role';
DO $$
DECLARE
  db text := current_setting('falcon.database');
  owner_role text := current_setting('falcon.owner_role');
  writer text := current_setting('falcon.writer_role');
BEGIN
  -- PUBLIC may connect to and make temporary tables in every new database: only the
  -- owner (implicitly) and the writer (below) may here. First, so that the writer's
  -- check below does not count what it has through PUBLIC.
  IF has_database_privilege('public', db, 'CONNECT') OR has_database_privilege('public', db, 'TEMPORARY') THEN
    EXECUTE format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', db);
    RAISE NOTICE 'ansible-changed: revoked CONNECT, TEMPORARY on the database from PUBLIC';
  END IF;
  -- TEMPORARY: the writer's COPY staging table (falcon_svc/requestlog/postgres.py).
  IF NOT (has_database_privilege(writer, db, 'CONNECT') AND has_database_privilege(writer, db, 'TEMPORARY')) THEN
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I', db, writer);
    RAISE NOTICE 'ansible-changed: granted CONNECT, TEMPORARY on the database to the writer';
  END IF;
  IF NOT has_schema_privilege(writer, 'public', 'USAGE') THEN
    EXECUTE format('GRANT USAGE ON SCHEMA public TO %I', writer);
    RAISE NOTICE 'ansible-changed: granted USAGE on schema public to the writer';
  END IF;
  IF NOT has_schema_privilege(owner_role, 'public', 'CREATE') THEN
    EXECUTE format('GRANT USAGE, CREATE ON SCHEMA public TO %I', owner_role);
    RAISE NOTICE 'ansible-changed: the owner may create in schema public';
  END IF;
  IF has_schema_privilege(writer, 'public', 'CREATE') THEN
    REVOKE CREATE ON SCHEMA public FROM PUBLIC;
    EXECUTE format('REVOKE CREATE ON SCHEMA public FROM %I', writer);
    RAISE NOTICE 'ansible-changed: revoked CREATE on schema public';
  END IF;
END
$$;
