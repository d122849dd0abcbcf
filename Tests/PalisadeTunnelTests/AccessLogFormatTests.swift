import Foundation
@testable import PalisadeL7
import PalisadeIdentity
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
            XCTAssertEqual(UTCTime.string(Date(timeIntervalSince1970: t), milliseconds: true), expected, "\(t)")
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

/// State files, flow events and the issuer's records: RFC 3339 UTC by
/// arithmetic, the same text Foundation's `.iso8601` writes and reads.
final class UTCTimeTests: XCTestCase {
    struct Stamped: Codable, Equatable { var at: Date }

    func testSameTextAsFoundationsISO8601BothWays() throws {
        for t in [0.0, 951_782_400, 1_795_915_706, 4_107_542_399, -1_000_000_000] + (0..<2000).map { _ in Double(Int.random(in: -2_000_000_000...5_000_000_000)) } {
            let value = Stamped(at: Date(timeIntervalSince1970: t))
            let ours = JSONEncoder(), theirs = JSONEncoder()
            ours.dateEncodingStrategy = .utc
            theirs.dateEncodingStrategy = .iso8601
            let a = try ours.encode(value), b = try theirs.encode(value)
            XCTAssertEqual(String(decoding: a, as: UTF8.self), String(decoding: b, as: UTF8.self))
            let read = JSONDecoder(), readTheirs = JSONDecoder()
            read.dateDecodingStrategy = .utc
            readTheirs.dateDecodingStrategy = .iso8601
            XCTAssertEqual(try read.decode(Stamped.self, from: b), value)
            XCTAssertEqual(try readTheirs.decode(Stamped.self, from: a), value)
        }
    }

    func testFractionsAndBadText() {
        XCTAssertEqual(UTCTime.date("2026-11-30T09:30:00.250Z")?.timeIntervalSince1970, 1_796_031_000.25)
        XCTAssertEqual(UTCTime.string(Date(timeIntervalSince1970: 1_796_031_000.25), milliseconds: true), "2026-11-30T09:30:00.250Z")
        XCTAssertEqual(UTCTime.date("2024-02-29T00:00:00Z").map { UTCTime.string($0) }, "2024-02-29T00:00:00Z")
        for bad in ["", "2026-11-30", "2026-11-30T09:30:00", "2026-11-30T09:30:00+01:00", "2026-13-01T00:00:00Z", "2023-02-29T00:00:00Z",
                    "2026-11-30T24:00:00Z", "2026-11-30T09:30:00.Z", "2026-11-30 09:30:00Z", "2026-1a-30T09:30:00Z"] {
            XCTAssertNil(UTCTime.date(bad), bad)
        }
        let d = JSONDecoder()
        d.dateDecodingStrategy = .utc
        XCTAssertThrowsError(try d.decode(Stamped.self, from: Data(#"{"at":"yesterday"}"#.utf8))) { error in
            XCTAssertTrue("\(error)".contains("expected an RFC 3339 UTC time"), "\(error)")
        }
    }
}
