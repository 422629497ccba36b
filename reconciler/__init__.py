"""reconciler: keeps container networking and HAProxy backends equal to Consul KV."""
