# OpenBao node 3 of the docker-compose "cluster" profile: integrated storage (raft), no TLS (a compose
# network only; put TLS on the listener anywhere else). Its file audit device has its own name: devices
# declared in config land in the cluster's shared audit table, and two nodes declaring one name with
# different files stop failover ("modifications to audit devices are not allowed").
storage "raft" {
  path    = "/openbao/raft"
  node_id = "node3"
  retry_join {
    leader_api_addr = "http://bao1:8200"
  }
}
listener "tcp" {
  address         = "0.0.0.0:8200"
  cluster_address = "0.0.0.0:8201"
  tls_disable     = true
}
api_addr     = "http://bao3:8200"
cluster_addr = "https://bao3:8201"
audit "file" "node3" {
  options {
    file_path = "/openbao/audit/node3.log"
  }
}
