import Foundation
import PalisadeIdentity
import PalisadePolicy

/// Target "policy": every policy parser (Palisade's format and Kubernetes
/// NetworkPolicy, dispatched by apiVersion/kind), then the compiler and both
/// evaluators on whatever parses (they must agree).
let universe: Universe = {
    var w: [NumericIdentity: WorkloadIdentity] = [:]
    for i in 0..<4 {
        w[NumericIdentity(256 + UInt32(i))] = WorkloadIdentity(
            spiffeID: try! SpiffeID("spiffe://td/ns/n\(i % 2)/sa/w\(i)"), labels: ["app": "w\(i)", "tier": i < 2 ? "a" : "b"],
            namespace: "n\(i % 2)", addresses: [.v4(10, 0, 0, UInt8(i + 1)), IPAddress("fd00::\(i + 1)")!],
            isLocal: i < 3, ports: [NamedPort(name: "http", port: UInt16(80 + i))])
    }
    return Universe(workloads: w, hostAddresses: [.v4(10, 0, 0, 254)])
}()

func fuzzPolicy(_ bytes: UnsafeBufferPointer<UInt8>) {
    let text = String(decoding: bytes, as: UTF8.self)
    guard let set = try? PolicySet.load([("fuzz.yaml", text)]) else { return }
    guard let compiled = try? PolicyCompiler.compile(set, universe: universe) else { return }
    let reference = ReferenceEvaluator(set: set, universe: universe)
    let lookup = CompiledLookup(compiled)
    for peer in [IPAddress.v4(10, 0, 0, 2), .v4(8, 8, 8, 8), IPAddress("fd00::3")!] {
        for d in Direction.allCases {
            let f = Flow(local: NumericIdentity(256), direction: d, peerAddress: peer, proto: 6, port: 80)
            if reference.evaluate(f).verdict != lookup.evaluate(f).verdict { fatalError("compiled lookup disagrees with the reference on \(f)") }
        }
    }
    _ = PolicyWriter.yaml(set.policies)
}
