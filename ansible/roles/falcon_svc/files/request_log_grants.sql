-- Table privileges of the writer role on request_log (falcon_svc role, tasks/configure.yml,
-- after the migrations created the table). Run by psql as postgres with
-- --set=writer_role=...; tests/integration/test_postgres_grants.py runs this very file
-- against a real PostgreSQL and then the real request-log writer as that role.
-- Each change prints a NOTICE starting with "ansible-changed" (the task's changed).
--
-- What the writer runs (falcon_svc/requestlog/postgres.py): COPY into its own temporary
-- table, then INSERT INTO request_log ... SELECT ... ON CONFLICT (log_id, received_at)
-- DO NOTHING, and SELECT 1 as a probe. INSERT is the privilege; the conflict target (the
-- primary key, which holds the partition key since migration 0002) makes PostgreSQL
-- require SELECT on its columns as well, so the writer gets SELECT (log_id, received_at)
-- and can read no other column: not the texts, digests, routes or labels it wrote.
-- Privileges on the partitioned table cover its partitions (rows are routed through
-- it), so the partitions the retention job creates need no grant; the writer cannot
-- create, read or drop them.
SET client_min_messages = notice;
SET falcon.writer_role = :'writer_role';
DO $$
DECLARE
  writer text := current_setting('falcon.writer_role');
BEGIN
  -- Earlier releases granted SELECT on the whole table.
  IF has_table_privilege(writer, 'public.request_log', 'SELECT') THEN
    EXECUTE format('REVOKE SELECT ON public.request_log FROM %I', writer);
    RAISE NOTICE 'ansible-changed: revoked SELECT on request_log from the writer';
  END IF;
  IF NOT has_table_privilege(writer, 'public.request_log', 'INSERT') THEN
    EXECUTE format('GRANT INSERT ON public.request_log TO %I', writer);
    RAISE NOTICE 'ansible-changed: granted INSERT on request_log to the writer';
  END IF;
  IF NOT has_column_privilege(writer, 'public.request_log', 'log_id', 'SELECT') THEN
    EXECUTE format('GRANT SELECT (log_id) ON public.request_log TO %I', writer);
    RAISE NOTICE 'ansible-changed: granted SELECT (log_id) on request_log to the writer';
  END IF;
  IF NOT has_column_privilege(writer, 'public.request_log', 'received_at', 'SELECT') THEN
    EXECUTE format('GRANT SELECT (received_at) ON public.request_log TO %I', writer);
    RAISE NOTICE 'ansible-changed: granted SELECT (received_at) on request_log to the writer';
  END IF;
END
$$;
