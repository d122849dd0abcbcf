import PalisadeIdentity
import XCTest

/// HOST:PORT is read and written one way everywhere.
final class HostPortTests: XCTestCase {
    func testReadsAndWritesOneWay() {
        XCTAssertEqual(HostPort("10.0.0.1:15008"), HostPort(host: "10.0.0.1", port: 15008))
        XCTAssertEqual(HostPort("[fd00::1]:8080"), HostPort(host: "fd00::1", port: 8080))
        XCTAssertEqual(HostPort("issuer.shop.test:15100")?.host, "issuer.shop.test")
        for bad in ["fd00::1:8080", "10.0.0.1", "10.0.0.1:", ":80", "10.0.0.1:0", "10.0.0.1:65536", "10.0.0.1:http", "[]:80"] {
            XCTAssertNil(HostPort(bad), bad)
        }
        XCTAssertEqual(HostPort("0.0.0.0:0", ports: 0...65535)?.port, 0, "a listener may ask for any free port")
        XCTAssertEqual(HostPort(host: "fd00::1", port: 443).description, "[fd00::1]:443")
        XCTAssertEqual(HostPort(host: "10.0.0.1", port: 443).description, "10.0.0.1:443")
        XCTAssertEqual(HostPort(HostPort(host: "::1", port: 9).description), HostPort(host: "::1", port: 9))
    }
}
