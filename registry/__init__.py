"""zonemesh registry: instances in etcd under leases, the heartbeat clients, and the live catalog."""

from registry.catalog import Catalog, Snapshot
from registry.etcd import EtcdSettings
from registry.heartbeat import HeartbeatClient, SyncHeartbeatClient
from registry.model import GatewayRecord, Instance, new_instance_id

__all__ = [
    "Catalog", "EtcdSettings", "GatewayRecord", "HeartbeatClient", "Instance", "Snapshot", "SyncHeartbeatClient",
    "new_instance_id",
]  # fmt: skip
