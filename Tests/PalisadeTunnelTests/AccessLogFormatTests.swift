import Foundation
@testable import PalisadeL7
import XCTest

/// The access log's own formatting (it runs per L7 request, so it avoids
/// Foundation's formatters): timestamps agree with glibc's gmtime, strings
/// are escaped as JSON requires.
final class AccessLogFormatTests: XCTestCase {
    func testTimestampsAgreeWithGmtime() {
        var instants: [Double] = [0, 951_782_400 /* 2000-02-29 */, 951_868_799.999, 4_107_542_400 /* 2100-03-01 */, 1_795_915_706.123,
                                  -86_400.5 /* 1969-12-30T23:59:59.500 */]
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<20_000 { instants.append(Double(Int.random(in: -2_000_000_000...5_000_000_000, using: &rng)) + Double(Int.random(in: 0..<1000)) / 1000 + 0.0004) }
        for t in instants {
            var seconds = time_t(t.rounded(.down))
            var tm = tm()
            gmtime_r(&seconds, &tm)
            let millis = Int((t - Double(seconds)) * 1000)
            let expected = String(format: "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, millis)
            XCTAssertEqual(Timestamp.rfc3339(Date(timeIntervalSince1970: t)), expected, "\(t)")
        }
    }

    func testStringsAreEscaped() throws {
        for s in ["/plain/path?q=1", "quote\" back\\slash", "line\nbreak\ttab\r", "ctl\u{01}\u{7F}", "ünïcødé ✓", ""] {
            var o: [UInt8] = []
            AccessLogEntry.quote(s, into: &o)
            let decoded = try JSONDecoder().decode(String.self, from: Data(o))
            XCTAssertEqual(decoded, s)
        }
    }
}
