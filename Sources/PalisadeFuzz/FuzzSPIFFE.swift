import PalisadeCA
import PalisadeIdentity
import X509

/// Target "spiffe": SPIFFE ID parsing (what parses prints back to itself)
/// and the SVID rules applied to any certificate that parses from DER.
func fuzzSPIFFE(_ bytes: UnsafeBufferPointer<UInt8>) {
    let text = String(decoding: bytes, as: UTF8.self)
    if let id = try? SpiffeID(text) {
        guard let again = try? SpiffeID(id.description), again == id else { fatalError("\(id) does not parse back to itself") }
        _ = id.isWithin(id)
    }
    if let cert = try? Certificate(derEncoded: Array(bytes)) {
        _ = SPIFFEVerifier.checkLeaf(cert, trustDomain: nil)
        _ = SPIFFEVerifier.checkLeaf(cert, trustDomain: "example.org")
    }
}
