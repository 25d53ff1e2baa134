"""What happens between and around steps."""
