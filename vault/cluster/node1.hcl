# OpenBao node 1 of the docker-compose "cluster" profile: integrated storage (raft), no TLS (a compose
# network only; put TLS on the listener anywhere else). Its file audit device has its own name: devices
# declared in config land in the cluster's shared audit table, and two nodes declaring one name with
# different files stop failover ("modifications to audit devices are not allowed").
storage "raft" {
  path    = "/openbao/raft"
  node_id = "node1"
}
listener "tcp" {
  address         = "0.0.0.0:8200"
  cluster_address = "0.0.0.0:8201"
  tls_disable     = true
}
api_addr     = "http://bao1:8200"
cluster_addr = "https://bao1:8201"
audit "file" "node1" {
  options {
    file_path = "/openbao/audit/node1.log"
  }
}
