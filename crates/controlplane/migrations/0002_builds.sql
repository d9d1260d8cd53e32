-- Builds (deno install at deploy time): their output holds npm's symlinked
-- node_modules layout, and a deployment keeps what its build printed.
ALTER TABLE deployment_files ADD COLUMN symlink_target TEXT;
ALTER TABLE deployments ADD COLUMN build_log TEXT;
