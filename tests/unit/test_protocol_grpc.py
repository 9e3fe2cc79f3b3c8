from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc

from protocol import coordinator_pb2 as pb
from protocol import coordinator_pb2_grpc as pb_grpc


def test_generated_grpc_module_imports_through_the_package() -> None:
    source = Path(pb_grpc.__file__).read_text()
    assert "from protocol import coordinator_pb2" in source
    assert "\nimport coordinator_pb2" not in source


def test_messages_round_trip() -> None:
    req = pb.EnrollRequest(secret="s", public_key_pem=b"-----BEGIN PUBLIC KEY-----\n", name="n1")
    assert pb.EnrollRequest.FromString(req.SerializeToString()) == req
    reply = pb.EnrollReply(node_id=7, flower_node_id="18446744073709551615", institution="U",
                           run_id="r", fleet_address="h:1", coordinator_public_key_pem=b"k")
    assert pb.EnrollReply.FromString(reply.SerializeToString()) == reply
    ping = pb.PingReply(run_id="r", version=3)
    assert pb.PingReply.FromString(ping.SerializeToString()) == ping
    req2 = pb.StatementRequest(node_id=7, timestamp=1_700_000_000.5, signature=b"\x30sig")
    assert pb.StatementRequest.FromString(req2.SerializeToString()) == req2
    st = pb.StatementReply(statement_json='{"format": "atom-statement-v1"}')
    assert pb.StatementReply.FromString(st.SerializeToString()) == st
    status = pb.StatusRequest(view="node", node_id=7, since_event_id=2**40, requester_node_id=7,
                              timestamp=1_700_000_000.25, signature=b"\x30sig")
    assert pb.StatusRequest.FromString(status.SerializeToString()) == status
    reply = pb.StatusReply(json='{"format": "atom-status-v1"}')
    assert pb.StatusReply.FromString(reply.SerializeToString()) == reply
    proofs = pb.ReceiptProofReply(
        tree_head=pb.SignedTreeHead(run_id="r", tree_size=2**40, root="ab" * 32,
                                    issued_at=1_700_000_000.5, signature=b"\x30sig"),
        proofs=[pb.ReceiptProof(receipt_json='{"receipt": {}}', leaf_index=2**40 - 1,
                                audit_path=[b"\x01" * 32, b"\x02" * 32])])
    assert pb.ReceiptProofReply.FromString(proofs.SerializeToString()) == proofs


def test_service_shape() -> None:
    service = pb.DESCRIPTOR.services_by_name["Coordinator"]
    assert pb.DESCRIPTOR.package == "atom.v1"
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods == {"Enroll": ("EnrollRequest", "EnrollReply"),
                       "Ping": ("PingRequest", "PingReply"),
                       "GetCreditStatement": ("StatementRequest", "StatementReply"),
                       "GetReceiptProofs": ("StatementRequest", "ReceiptProofReply"),
                       "GetStatus": ("StatusRequest", "StatusReply"),
                       "WatchStatus": ("StatusRequest", "StatusReply"),
                       "FetchBlob": ("FetchBlobRequest", "BlobChunk"),
                       "PutBlob": ("BlobUpload", "PutBlobReply"),
                       "SubmitReply": ("SubmitReplyRequest", "SubmitReplyReply"),
                       "NextWork": ("NextWorkRequest", "NextWorkReply")}
    put = service.methods_by_name["PutBlob"]
    assert put.client_streaming and not put.server_streaming
    fetch = service.methods_by_name["FetchBlob"]
    assert fetch.server_streaming and not fetch.client_streaming
    watch = service.methods_by_name["WatchStatus"]
    assert watch.server_streaming and not watch.client_streaming
    assert [(f.name, f.number) for f in pb.BlobChunk.DESCRIPTOR.fields] == [
        ("size", 1), ("offset", 2), ("data", 3)]
    fields = {f.name: (f.number, f.type) for f in pb.StatusRequest.DESCRIPTOR.fields}
    fd = pb.StatusRequest.DESCRIPTOR.fields[0]
    assert fields == {"view": (1, fd.TYPE_STRING), "node_id": (2, fd.TYPE_INT64),
                      "since_event_id": (3, fd.TYPE_INT64),
                      "requester_node_id": (4, fd.TYPE_INT64),
                      "timestamp": (5, fd.TYPE_DOUBLE), "signature": (6, fd.TYPE_BYTES)}
    assert [(f.name, f.number) for f in pb.StatusReply.DESCRIPTOR.fields] == [("json", 1)]
    assert [(f.name, f.number) for f in pb.NextWorkReply.DESCRIPTOR.fields] == [
        ("work", 1), ("retry_after_s", 2)]


class _Servicer(pb_grpc.CoordinatorServicer):
    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingReply:
        return pb.PingReply(run_id="run-1", version=12)


def test_ping_over_loopback() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    pb_grpc.add_CoordinatorServicer_to_server(_Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            assert stub.Ping(pb.PingRequest(), timeout=10) == pb.PingReply(run_id="run-1",
                                                                           version=12)
            try:
                stub.Enroll(pb.EnrollRequest(), timeout=10)
                raise AssertionError("unimplemented RPC answered")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(grace=None).wait()
