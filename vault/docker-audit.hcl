# File audit device for the docker-compose OpenBao (audit devices can only be declared in config).
audit "file" "main" {
  options {
    file_path = "/vault/audit/audit.log"
  }
}
