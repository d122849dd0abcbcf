import XCTest
@testable import PalisadeTunnel

/// What the tunnel's receiving side reads from a CONNECT request, without
/// sockets: the destination (":authority") and the caller's address
/// (`forwarded: for=`, RFC 7239).
final class TunnelParsingTests: XCTestCase {
    func testAuthority() {
        XCTAssertEqual(parseAuthority("10.102.1.2:8080").map { "\($0.host) \($0.port)" }, "10.102.1.2 8080")
        XCTAssertEqual(parseAuthority("[fd00:102:1::2]:443").map { "\($0.host) \($0.port)" }, "fd00:102:1::2 443")
        for bad in ["10.102.1.2", "10.102.1.2:", "10.102.1.2:0", "10.102.1.2:65536", "10.102.1.2:80x", "fd00::2:80", "[fd00::2]", ":80", ""] {
            XCTAssertNil(parseAuthority(bad), bad)
        }
    }

    func testForwardedFor() {
        XCTAssertEqual(forwardedFor("for=10.101.1.2"), "10.101.1.2")
        XCTAssertEqual(forwardedFor("for=\"[fd00:101:1::2]\";proto=http"), "fd00:101:1::2")
        XCTAssertEqual(forwardedFor("proto=http; for=10.1.1.1, for=10.2.2.2"), "10.1.1.1", "the first hop: the caller")
        XCTAssertNil(forwardedFor("proto=http"))
        XCTAssertNil(forwardedFor("for="))
        XCTAssertNil(forwardedFor(nil))
    }
}
