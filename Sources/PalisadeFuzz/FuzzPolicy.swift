import Foundation
import PalisadeIdentity
import PalisadePolicy

/// libFuzzer entry: every policy parser (Palisade's format and Kubernetes
/// NetworkPolicy, dispatched by apiVersion/kind), then the compiler and both
/// evaluators on whatever parses. A crash or sanitizer report is a bug; a
/// thrown error is the expected answer to bad input.
/// Built only with PALISADE_FUZZ=1 (see tools/fuzz/run).
let universe: Universe = {
    var w: [NumericIdentity: WorkloadIdentity] = [:]
    for i in 0..<4 {
        w[NumericIdentity(256 + UInt32(i))] = WorkloadIdentity(
            spiffeID: try! SpiffeID("spiffe://td/ns/n\(i % 2)/sa/w\(i)"), labels: ["app": "w\(i)", "tier": i < 2 ? "a" : "b"],
            namespace: "n\(i % 2)", addresses: [.v4(10, 0, 0, UInt8(i + 1)), IPAddress("fd00::\(i + 1)")!])
    }
    return Universe(workloads: w, hostAddresses: [.v4(10, 0, 0, 254)])
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let text = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    guard let set = try? PolicySet.load([("fuzz.yaml", text)]) else { return 0 }
    guard let compiled = try? PolicyCompiler.compile(set, universe: universe) else { return 0 }
    let reference = ReferenceEvaluator(set: set, universe: universe)
    let lookup = CompiledLookup(compiled)
    for peer in [IPAddress.v4(10, 0, 0, 2), .v4(8, 8, 8, 8), IPAddress("fd00::3")!] {
        for d in Direction.allCases {
            let f = Flow(local: NumericIdentity(256), direction: d, peerAddress: peer, proto: 6, port: 80)
            if reference.evaluate(f).verdict != lookup.evaluate(f).verdict { fatalError("compiled lookup disagrees with the reference on \(f)") }
        }
    }
    _ = PolicyWriter.yaml(set.policies)
    return 0
}
