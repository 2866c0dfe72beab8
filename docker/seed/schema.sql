-- The schema of config/sharded.toml's database "shop", created on every
-- shard by docker/seed/seed.sh (psql -v shard=N -v shards=M).
CREATE TABLE IF NOT EXISTS countries (code text PRIMARY KEY, name text NOT NULL);
-- Per-shard sequence offsets: shard i of M hands out i+1, i+1+M, ...
SELECT format('CREATE SEQUENCE IF NOT EXISTS users_id_seq INCREMENT BY %s START WITH %s', :shards, :shard + 1) \gexec
CREATE TABLE IF NOT EXISTS users (
  id bigint PRIMARY KEY DEFAULT nextval('users_id_seq'),
  name text NOT NULL,
  country text REFERENCES countries (code)
);
CREATE TABLE IF NOT EXISTS orders (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id bigint NOT NULL,
  amount numeric NOT NULL
);
CREATE TABLE IF NOT EXISTS events (region text NOT NULL, what text NOT NULL, at timestamptz DEFAULT now());
CREATE TABLE IF NOT EXISTS tenants (tenant_id text PRIMARY KEY, name text NOT NULL);
CREATE TABLE IF NOT EXISTS invoices (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  tenant_id text NOT NULL,
  total numeric NOT NULL
);
-- Reference data: the same rows on every shard.
INSERT INTO countries VALUES ('ch', 'Switzerland'), ('us', 'United States'), ('ca', 'Canada')
  ON CONFLICT DO NOTHING;
