import Foundation

/// libFuzzer entry for every target; PALISADE_FUZZ_TARGET picks one
/// (tools/fuzz/run runs each with its own corpus). A crash, a sanitizer
/// report or a broken invariant (a fatalError) is a bug; a thrown error is
/// the expected answer to bad input. Built only with PALISADE_FUZZ=1.
let fuzzTarget = ProcessInfo.processInfo.environment["PALISADE_FUZZ_TARGET"] ?? "policy"

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = UnsafeBufferPointer(start: data, count: size)
    switch fuzzTarget {
    case "policy": fuzzPolicy(bytes)
    case "spiffe": fuzzSPIFFE(bytes)
    case "config": fuzzConfig(bytes)
    case "etcd": fuzzEtcd(bytes)
    case "http1": fuzzHTTP1(bytes)
    case "http1request": fuzzHTTP1Request(bytes)
    case "http1response": fuzzHTTP1Response(bytes)
    case "http2": fuzzHTTP2(bytes)
    case "http2response": fuzzHTTP2Response(bytes)
    case "dns": fuzzDNS(bytes)
    default: fatalError("unknown PALISADE_FUZZ_TARGET \(fuzzTarget)")
    }
    return 0
}
