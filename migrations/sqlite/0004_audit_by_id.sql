-- The audit log is paged by id within an organization (GET /audit): without this index each
-- page sorted the organization's whole history, which is never purged.
CREATE INDEX audit_logs_organization_id ON audit_logs(organization_id, id);
